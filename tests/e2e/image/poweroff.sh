#!/bin/sh
# domU /sbin/poweroff: the kernel runs it on `xl shutdown` (orderly_poweroff); /init is a shell,
# not busybox init, so busybox's signal-to-init poweroff would do nothing.
sync
exec /usr/bin/busybox poweroff -f
