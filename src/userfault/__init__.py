"""userfault: on-demand paging from userland on Linux."""
