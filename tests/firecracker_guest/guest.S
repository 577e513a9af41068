/*
 * A tiny 64-bit guest for Firecracker snapshot/restore tests.
 *
 * Boot: Firecracker enters _start in 64-bit long mode, interrupts off, with the first 1 GiB
 * of guest-physical memory identity mapped by its own page tables (64-bit Linux boot
 * protocol; we ship no PVH note). RSI points at the Linux "zero page" and the kernel command
 * line is somewhere in memory: we ignore both.
 *
 * Work: an endless loop of "ticks". Tick N
 *   1. checks that every 4 KiB page in [TOUCH_START, TOUCH_END) still holds the stamp
 *      written by tick N-1 (stamp = tick << 32 | page index; tick 1 has nothing to check),
 *   2. writes the stamp of tick N into every page,
 *   3. prints "tick N ok\n" (or "tick N bad\n") on the serial port (8250 UART at 0x3f8),
 *   4. spins about DELAY_CYCLES TSC cycles so the output stays readable.
 * After a snapshot restore whose memory is served lazily, step 1 of the next tick faults
 * every page of the range and proves each was served with the right contents.
 */

#define COM1          0x3f8
#define TOUCH_START   (64 << 20)        /* 64 MiB */
#define TOUCH_END     (120 << 20)       /* 120 MiB: 14336 pages of 4 KiB */
#define PAGE          4096
#define DELAY_CYCLES  50000000          /* ~20 ms at 2.5 GHz */

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    lea     stack_top(%rip), %rsp
    lea     msg_boot(%rip), %rsi
    call    puts
    xor     %r12d, %r12d                /* r12 = tick number */

tick:
    inc     %r12
    xor     %r13d, %r13d                /* r13 = 1 if a page is bad */

    /* 1. verify the stamps of the previous tick (skip on tick 1) */
    cmp     $1, %r12
    je      write
    mov     %r12, %rdx
    dec     %rdx
    shl     $32, %rdx                   /* rdx = (tick - 1) << 32 */
    mov     $TOUCH_START, %rdi
    xor     %ecx, %ecx                  /* rcx = page index */
1:  lea     (%rdx,%rcx), %rax
    cmp     %rax, (%rdi)
    je      2f
    mov     $1, %r13d
2:  add     $PAGE, %rdi
    inc     %rcx
    cmp     $TOUCH_END, %rdi
    jb      1b

write:
    /* 2. stamp every page with this tick */
    mov     %r12, %rdx
    shl     $32, %rdx
    mov     $TOUCH_START, %rdi
    xor     %ecx, %ecx
1:  lea     (%rdx,%rcx), %rax
    mov     %rax, (%rdi)
    add     $PAGE, %rdi
    inc     %rcx
    cmp     $TOUCH_END, %rdi
    jb      1b

    /* 3. report */
    lea     msg_tick(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    lea     msg_ok(%rip), %rsi
    test    %r13d, %r13d
    jz      1f
    lea     msg_bad(%rip), %rsi
1:  call    puts

    /* 4. wait a little, measured with the TSC */
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    mov     %rdx, %r8
    add     $DELAY_CYCLES, %r8
1:  pause
    rdtsc
    shl     $32, %rdx
    or      %rax, %rdx
    cmp     %r8, %rdx
    jb      1b
    jmp     tick

/* puts: write the NUL-terminated string at rsi to COM1. Clobbers rax, rdx, rsi. */
puts:
    mov     $COM1, %dx
1:  lodsb
    test    %al, %al
    jz      2f
    outb    %al, %dx
    jmp     1b
2:  ret

/* putdec: write rax in decimal to COM1. Clobbers rax, rcx, rdx, rsi, r9. */
putdec:
    lea     numbuf_end(%rip), %rsi
    movb    $0, (%rsi)
    mov     $10, %r9
1:  xor     %edx, %edx
    div     %r9
    add     $'0', %dl
    dec     %rsi
    mov     %dl, (%rsi)
    test    %rax, %rax
    jnz     1b
    jmp     puts

    .section .rodata
msg_boot: .asciz "guest booted\n"
msg_tick: .asciz "tick "
msg_ok:   .asciz " ok\n"
msg_bad:  .asciz " bad\n"

    .section .bss
    .balign 16
numbuf:     .skip 24
numbuf_end: .skip 8
    .balign 16
stack:      .skip 8192
stack_top:
