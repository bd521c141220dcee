// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * `tracer destroy --via bpf`: end chosen TCP sockets from an iter/tcp
 * program with the bpf_sock_destroy() kfunc (v6.5, net/core/filter.c),
 * instead of SOCK_DESTROY over sock_diag (pytracer/inventory/bpfdestroy.py).
 *
 * User space puts the cookies of the sockets to end in `victims`, then
 * reads the iterator once, from inside the socket's network namespace
 * (the tcp iterator walks the namespace of the task that created the
 * iterator fd).  For each victim visited, the kfunc's answer (0 or
 * -errno) goes to `results`.  Only full sockets are ended: a timewait or
 * request minisocket is a sock_common only, and the kfunc reads struct
 * sock fields; listeners never.  The iterator holds the socket's lock
 * while the program runs (net/ipv4/tcp_ipv4.c, bpf_iter_tcp_seq_show),
 * which the kfunc requires.
 */
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define PT_DESTROY_MAX	1024
#define TCP_LISTEN_ST	10	/* include/net/tcp_states.h */
#define TCP_TIME_WAIT_ST 6
#define TCP_NEW_SYN_RECV_ST 12
#define EOPNOTSUPP_	95
#define EPERM_		1

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PT_DESTROY_MAX);
	__type(key, __u64);	/* socket cookie */
	__type(value, __u8);
} victims SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PT_DESTROY_MAX);
	__type(key, __u64);	/* socket cookie */
	__type(value, __s32);	/* 0, or -errno */
} results SEC(".maps");

SEC("iter/tcp")
int end_sockets(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	__u64 cookie;
	__s32 err;

	if (!skc)
		return 0;
	cookie = bpf_get_socket_cookie(skc);
	if (!bpf_map_lookup_elem(&victims, &cookie))
		return 0;
	switch (skc->skc_state) {
	case TCP_LISTEN_ST:
		err = -EPERM_;
		break;
	case TCP_TIME_WAIT_ST:
	case TCP_NEW_SYN_RECV_ST:
		err = -EOPNOTSUPP_;
		break;
	default:
		err = bpf_sock_destroy(skc);
	}
	bpf_map_update_elem(&results, &cookie, &err, BPF_ANY);
	return 0;
}
