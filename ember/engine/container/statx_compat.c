/* ember: statx() for programs in gVisor sandboxes run by runsc 20221219 (Debian 12).
 *
 * That runsc refuses statx(2) calls that carry AT_NO_AUTOMOUNT with EINVAL, and coreutils 9
 * (ls, stat) always pass it, so `ls -l` fails with "Invalid argument". gVisor has no
 * automount points, so the flag means nothing there: this library, preloaded through
 * /etc/ld.so.preload in gVisor sandboxes only, clears it and makes the call directly.
 * It depends on nothing but syscall(), so it loads into any x86_64 glibc program. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef AT_NO_AUTOMOUNT
#define AT_NO_AUTOMOUNT 0x800
#endif

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
