/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The record bpf/fdscan.bpf.c writes, one per process and one per open
 * file.  pytracer/inventory/fdscan.py mirrors it (FD_REC_DTYPE) and
 * tests/unit/inventory/test_fdscan.py checks the layout against the object's BTF.
 */
#ifndef __PYTRACER_FDSCAN_H
#define __PYTRACER_FDSCAN_H

/* pt_fd_rec.kind */
#define PT_FD_TASK	0	/* a process: ino is its netns inode, fd is -1 */
#define PT_FD_SOCKET	1	/* a socket: ino is its inode ("socket:[INO]") */
#define PT_FD_NETNS	2	/* an nsfs fd of a network namespace ("net:[INO]") */
#define PT_FD_OTHER	3	/* any other file: counted, ino 0 */

/* At most this many pids in a filtered scan (map only_tgids). */
#define PT_FD_ONLY_MAX	4096

struct pt_fd_rec {
	__u32 tgid;
	__s32 fd;
	__u64 ino;
	__u32 kind;
	__u32 _pad;
};

#endif /* __PYTRACER_FDSCAN_H */
