"""Quick start: map a buffer lazily and watch pages arrive on first touch."""

import userfault

data = bytes(range(256)) * 4096 * 4  # 4 MiB of sample data
with userfault.map(data, readahead=False, log_faults=16) as mem:
    view = memoryview(mem)  # nothing has been copied yet
    print("byte 5000:", view[5000], "| byte 4096000:", view[4096000])
    for fault in mem.faults():
        print(f"fault at source offset {fault.offset} (page {fault.offset // 4096})")
    print(f"{mem.stats().faults} faults for {mem.size // 4096} pages mapped")
    view.release()
