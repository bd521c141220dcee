/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Kernel-version drift, isolated here.  Every fix names the kernel change it
 * papers over, so it can go when the oldest supported kernel moves past it.
 */
#ifndef __CORE_FIXES_BPF_H
#define __CORE_FIXES_BPF_H

#include <vmlinux.h>
#include <bpf/bpf_core_read.h>

/*
 * struct sock::sk_protocol was an 8-bit bitfield until v5.6
 * (commit bf9765145b85 "sock: Make sk_protocol a 16-bit value"), and a plain
 * u16 after.  The PROBED bitfield read handles both layouts.
 */
static __always_inline __u16 sk_protocol_of(const struct sock *sk)
{
	return (__u16)BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol);
}

/*
 * inet_csk_accept() took (sk, flags, err, kern) until v6.10 and
 * (sk, struct proto_accept_arg *arg) after (commit 92ef0fd55ac8 "net: change
 * proto and proto_ops accept type").  bpf_get_func_ret() (v5.17) reads the
 * return value whatever the arity; before it, the old 4-argument layout is
 * the only one that exists.
 */
static __always_inline struct sock *accept_ret_of(__u64 *ctx)
{
	__u64 ret = 0;

	if (bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_get_func_ret)) {
		bpf_get_func_ret(ctx, &ret);
	} else {
		ret = ctx[4];
		/*
		 * Load ctx[4] here, as a fixed-offset ctx access.  Without this,
		 * clang merges both branches into one load through a pointer that
		 * is either &ret or ctx + 32, and the verifier rejects the
		 * latter ("dereference of modified ctx ptr").
		 */
		asm volatile("" : "+r"(ret));
	}
	return (struct sock *)ret;
}

#endif /* __CORE_FIXES_BPF_H */
