// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * What a per-socket record costs per state change, with nothing else:
 * the same minimal update of a pt_sock kept in a cookie-keyed hash (what
 * pytracer does) and in SK_STORAGE (the candidate), plus an empty program
 * for the bpf_stats floor.  Driven by bench/harness/recordcost.py.
 */
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "pytracer.h"

#define IPPROTO_TCP	6

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pt_sock);
} hash_recs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct pt_sock);
} sk_recs SEC(".maps");

static __always_inline bool is_birth(int old, int new)
{
	return (old == TCP_CLOSE && new == TCP_SYN_SENT) ||
	       (old == TCP_LISTEN && new == TCP_SYN_RECV);
}

static __always_inline void touch(struct pt_sock *r, int new, __u64 now)
{
	r->state = new;
	r->state_ns = now;
	r->history[r->transitions & (PT_HISTORY - 1)] = new;
	r->transitions++;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_empty, struct sock *sk, int old, int new)
{
	return 0;
}

/* A child's cookie is not final at SYN_RECV (see "embryos" in
 * pytracer.bpf.c): its record starts at its next event. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_hash, struct sock *sk, int old, int new)
{
	struct pt_sock *r;
	__u64 key, now;

	if (sk->sk_protocol != IPPROTO_TCP ||
	    (old == TCP_LISTEN && new == TCP_SYN_RECV))
		return 0;
	key = bpf_get_socket_cookie(sk);
	now = bpf_ktime_get_ns();
	r = bpf_map_lookup_elem(&hash_recs, &key);
	if (!r) {
		struct pt_sock z = {};

		touch(&z, new, now);
		bpf_map_update_elem(&hash_recs, &key, &z, BPF_ANY);
		return 0;
	}
	touch(r, new, now);
	if (new == TCP_CLOSE)
		bpf_map_delete_elem(&hash_recs, &key);
	return 0;
}

/* What every record layout pays before touching its record: the socket's
 * cookie and the clock, kept where the compiler cannot drop them. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} clock_sink SEC(".maps");

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_clock, struct sock *sk, int old, int new)
{
	__u32 zero = 0;
	__u64 *v, raw, key;

	if (sk->sk_protocol != IPPROTO_TCP ||
	    (old == TCP_LISTEN && new == TCP_SYN_RECV))
		return 0;
	raw = sk->__sk_common.skc_cookie.counter;
	key = raw ? raw : bpf_get_socket_cookie(sk);
	v = bpf_map_lookup_elem(&clock_sink, &zero);
	if (v)
		*v += key ^ bpf_ktime_get_ns();
	return 0;
}

/*
 * The candidate after SK_STORAGE: an array slot per socket, indexed by the
 * low bits of its cookie.  Cookies are handed out in increasing order, so
 * the sockets born together sit in neighbouring slots (no random bucket),
 * and an array lookup is inlined by the verifier (no hash, no bucket lock,
 * no allocation).  A slot still held by a socket 2^18 cookies older moves
 * that record to the hash; a record not in its slot is looked for there.
 * A socket whose raw cookie was still 0 before this event was never keyed,
 * so it can have no record anywhere: its birth looks nowhere.
 */
#define RC_SLOTS	262144

struct rc_slot {
	__u64 cookie;	/* 0: free */
	struct pt_sock rec;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RC_SLOTS);
	__type(key, __u32);
	__type(value, struct rc_slot);
} slot_recs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pt_sock);
} slot_spill SEC(".maps");

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_slot, struct sock *sk, int old, int new)
{
	struct rc_slot *s;
	struct pt_sock *r;
	__u64 raw, key, now;
	__u32 idx;

	if (sk->sk_protocol != IPPROTO_TCP ||
	    (old == TCP_LISTEN && new == TCP_SYN_RECV))
		return 0;
	raw = sk->__sk_common.skc_cookie.counter;
	key = raw ? raw : bpf_get_socket_cookie(sk);
	now = bpf_ktime_get_ns();
	idx = key & (RC_SLOTS - 1);
	s = bpf_map_lookup_elem(&slot_recs, &idx);
	if (!s)
		return 0;
	if (s->cookie == key) {
		touch(&s->rec, new, now);
		if (new == TCP_CLOSE)
			s->cookie = 0;
		return 0;
	}
	if (raw) {
		r = bpf_map_lookup_elem(&slot_spill, &key);
		if (r) {
			touch(r, new, now);
			if (new == TCP_CLOSE)
				bpf_map_delete_elem(&slot_spill, &key);
			return 0;
		}
	}
	if (s->cookie)	/* a long-lived socket: its record moves out */
		bpf_map_update_elem(&slot_spill, &s->cookie, &s->rec, BPF_ANY);
	__builtin_memset(&s->rec, 0, sizeof(s->rec));
	s->cookie = key;
	touch(&s->rec, new, now);
	return 0;
}

/* The storage goes with the socket: no delete, no cookie, no embryo. */
SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(rc_sk_storage, struct sock *sk, int old, int new)
{
	struct pt_sock *r;
	__u64 now;

	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	now = bpf_ktime_get_ns();
	r = bpf_sk_storage_get(&sk_recs, sk, 0,
			       is_birth(old, new) ? BPF_SK_STORAGE_GET_F_CREATE : 0);
	if (r)
		touch(r, new, now);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
