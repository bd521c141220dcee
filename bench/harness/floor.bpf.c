// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * The floor of watching the TCP lifecycle on this kernel: empty programs on
 * the hooks pytracer's default plan uses here (tp_btf inet_sock_set_state and
 * tcp_receive_reset).  Whatever any tool does on those
 * events costs at least this.  Driven by bench/harness/floor.py.
 */
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(floor_state, struct sock *sk, int old, int new)
{
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(floor_reset, struct sock *sk)
{
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
