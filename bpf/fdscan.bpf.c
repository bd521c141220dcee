// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * Who holds which fd, without walking /proc: two BPF iterators whose
 * output user space reads like a file (pytracer/inventory/fdscan.py).
 *
 *   iter/task       one PT_FD_TASK record per process (thread group leader):
 *                   its netns inode; kernel threads and processes without
 *                   open files included, as in /proc.
 *   iter/task_file  one record per open fd of every process: sockets with
 *                   their inode, nsfs fds of network namespaces with the
 *                   namespace's inode, anything else just counted.
 *
 * Both need v5.8 (bpf_iter task/task_file, bpf_seq_write) and kernel BTF.
 * Only leaders are reported: /proc/TGID/fd shows the leader's table.  The
 * task_file iterator already skips threads that share it
 * (kernel/bpf/task_iter.c, skip_if_dup_files); a thread made with clone()
 * without CLONE_FILES has a table of its own, which /proc/TGID/fd does not
 * show either, so it is skipped here too.
 */
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "fdscan.h"

#define S_IFMT		00170000
#define S_IFSOCK	0140000
#define NSFS_MAGIC	0x6e736673	/* include/uapi/linux/magic.h */

char LICENSE[] SEC("license") = "GPL";

/*
 * Scans of a few processes (--pid): user space puts their tgids here and
 * sets only_on[0] before reading, so other processes' files are skipped
 * before any work.  The kernel still walks every fd table.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PT_FD_ONLY_MAX);
	__type(key, __u32);
	__type(value, __u8);
} only_tgids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} only_on SEC(".maps");

static __always_inline bool wanted(__u32 tgid)
{
	__u32 zero = 0, *on = bpf_map_lookup_elem(&only_on, &zero);

	return !on || !*on || bpf_map_lookup_elem(&only_tgids, &tgid);
}

/*
 * ctx->task and ctx->file are BTF pointers: plain member loads (CO-RE
 * relocated through vmlinux.h's preserve_access_index) are checked by the
 * verifier and cost a load each, where BPF_CORE_READ would make a
 * bpf_probe_read_kernel call per field.  A NULL pointer met on the way
 * reads as 0.
 */
static __always_inline __u64 netns_of_task(struct task_struct *task)
{
	/* nsproxy is NULL once a task has exited (a zombie). */
	return BPF_CORE_READ(task, nsproxy, net_ns, ns.inum);
}

SEC("iter/task")
int fdscan_task(struct bpf_iter__task *ctx)
{
	struct task_struct *task = ctx->task;
	struct pt_fd_rec rec = {};

	if (!task)
		return 0;
	rec.tgid = task->tgid;
	if (task->pid != rec.tgid || !wanted(rec.tgid))
		return 0;
	rec.fd = -1;
	rec.kind = PT_FD_TASK;
	rec.ino = netns_of_task(task);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

/* "net" for an nsfs inode of a network namespace: nsfs keeps the
 * namespace's ns_common in i_private and names it ns->ops->name
 * (fs/nsfs.c, ns_dname); the inode number is ns->inum.  The name is read
 * rather than proc_ns_operations.type, which v6.18 moved into ns_common. */
static __always_inline bool is_netns_inode(struct inode *inode)
{
	struct ns_common *ns = BPF_CORE_READ(inode, i_private);
	const char *name = BPF_CORE_READ(ns, ops, name);
	char buf[4] = {};

	if (!name || bpf_probe_read_kernel(buf, sizeof(buf), name))
		return false;
	return buf[0] == 'n' && buf[1] == 'e' && buf[2] == 't' && buf[3] == 0;
}

SEC("iter/task_file")
int fdscan_file(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct pt_fd_rec rec = {};
	struct inode *inode;
	__u16 mode;

	if (!task || !file)
		return 0;
	rec.tgid = task->tgid;
	if (task->pid != rec.tgid || !wanted(rec.tgid))
		return 0;
	rec.fd = ctx->fd;
	rec.kind = PT_FD_OTHER;
	inode = file->f_inode;
	mode = inode->i_mode;
	if ((mode & S_IFMT) == S_IFSOCK) {
		/* sockfs names a socket file by its inode (net/socket.c, sockfs_dname). */
		rec.kind = PT_FD_SOCKET;
		rec.ino = inode->i_ino;
	} else if (inode->i_sb->s_magic == NSFS_MAGIC && is_netns_inode(inode)) {
		rec.kind = PT_FD_NETNS;
		rec.ino = inode->i_ino;
	}
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
