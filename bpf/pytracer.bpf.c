// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * pytracer kernel side: one record per TCP socket, from birth to destroy,
 * and every aggregate (counters, transition matrix, lifetime and
 * time-in-state histograms) kept in the kernel.  User space only polls.
 *
 * The lifecycle itself is bpf/lifecycle.bpf.h, shared with the bcc backend
 * (bpf/pytracer_bcc.c).  This file has the maps, the accessors that header
 * asks for (CO-RE reads, libbpf map calls) and the programs.
 *
 * Each hook has twins for different kernels; they all call one static
 * helper, and the loader switches the unused twins off before load
 * (bpf_program__set_autoload).  See pytracer/kernel/hooks.py for the choice.
 *
 *   state change   tp_btf/inet_sock_set_state > tracepoint > fentry > kprobe
 *   accept owner   fexit/inet_csk_accept > kretprobe > sys_exit_accept{,4}
 *   connect owner  the CLOSE -> SYN_SENT transition runs in connect()
 *   listen         fexit/inet_csk_listen_start > kretprobe (only with the
 *                  tcp_set_state() hooks, which never see CLOSE -> LISTEN)
 *   app close      fentry/tcp_close > kprobe > sys_enter_close
 *   end            the transition to CLOSE (no destroy hook)
 */
#include <vmlinux.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "pytracer.h"
#include "core_fixes.bpf.h"

#define AF_INET		2
#define AF_INET6	10
#define IPPROTO_TCP	6
#define S_IFMT		00170000
#define S_IFSOCK	0140000

/* Sized by the loader from --max-sockets before load; preallocated instead
 * where kprobe or tracepoint programs use it before 6.1 (the loader clears
 * the flag: see table_prealloc_reason() in pytracer/kernel/hooks.py). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pt_sock);
} socks SEC(".maps");

/*
 * The nursery: one slot per cookie modulo its size (sized by the loader,
 * a power of two; cfg.nursery_bits), in front of "socks".  Cookies are
 * handed out in increasing order, so sockets born together sit in
 * neighbouring slots: a record's lookup is an array access the verifier
 * inlines, and a birth takes no bucket lock and allocates nothing (a hash
 * record costs 2.2x a slot per event here: bench/harness/recordcost.py).
 * A socket still alive when a socket 2^nursery_bits cookies younger is
 * born moves to "socks", once; seeded records and keys by pointer live
 * there from the start.  slot.key 0: free.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);	/* read in place (pytracer.table.reads) */
	__type(key, __u32);
	__type(value, struct pt_slot);
} nursery SEC(".maps");

/*
 * How many times "socks" changed: bumped after every write to it (an
 * insert, a delete, a record living there written in place).  A reader
 * that finds it where it was before its last walk of "socks" knows that
 * walk's rows are still the table's, and reads the nursery alone
 * (pytracer.table.reads).  A storm's records live and die in the nursery
 * and never bump it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} socks_gen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_AGG_ENTRIES);
	__type(key, __u32);
	__type(value, struct pt_agg);
} agg SEC(".maps");

/* Owner filter (--pid): tgids whose sockets are counted. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} owners SEC(".maps");

/* Listening sockets' owners, so accepted children can be attributed (and
 * filtered) from birth, and never-accepted ones still name a process. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pt_listen_key);
	__type(value, __u32);
} listeners SEC(".maps");

/*
 * Per CPU: how many of our programs are running on it (see enter()), and
 * the accepted child born last on it, between its birth and its next event.
 *
 * inet_csk_clone_lock() reports a child's LISTEN -> SYN_RECV and only then
 * sets its cookie from the request socket (v5.10 .. v6.12 at least), so a
 * record made at SYN_RECV would be under the wrong key.  The record is made
 * at the child's next event, under its lasting cookie, with the birth time
 * kept here.  That next event comes in the same softirq, on the same CPU,
 * before any other packet is handled there (tcp_check_req() creates the
 * child, tcp_child_process() completes the handshake), so one slot per CPU
 * holds every child: no map insert, lookup or delete per connection.  Only
 * a TCP Fast Open child waits a round trip in SYN_RECV: when another child
 * is born on that CPU first, or its ACK lands on another CPU, its birth is
 * taken at its next event instead (its lifetime then lacks that round trip).
 */
struct pt_cpu {
	__u32 depth;
	__u32 pad;
	__u64 child_sk;		/* the child's struct sock, or 0 */
	__u64 child_ns;		/* its LISTEN -> SYN_RECV time */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_cpu);
} percpu SEC(".maps");

/* Service ports named by user space (--service-ports): port -> slot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PT_SVC_SLOTS);
	__type(key, struct pt_svc_key);
	__type(value, __u32);
} svc_ports SEC(".maps");

/* Per service slot (0: other): lifetime and idle-before-end histograms.
 * Like agg, twice: slot + PT_SVC_SLOTS takes the runs nested in another. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_SVC_SLOTS * PT_AGG_ENTRIES);
	__type(key, __u32);
	__type(value, struct pt_svc);
} svc SEC(".maps");

const volatile struct pt_config cfg = {};

/* --- what bpf/lifecycle.bpf.h needs: configuration --------------------- */

#define PT_CFG_FILTER_OWNER	cfg.filter_owner
#define PT_CFG_KEY_BY_PTR	cfg.key_by_ptr
#define PT_CFG_HZ		cfg.hz

/* --- aggregation --------------------------------------------------------- */


/* This CPU's entry of "percpu". */
static __always_inline struct pt_cpu *this_cpu(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&percpu, &zero);
}

/*
 * Programs run with migration off, but a program in process context can be
 * interrupted by a softirq that runs another of ours on the same CPU.  So
 * each program brackets its run with enter()/leave(), and a run that starts
 * inside another writes agg[1] instead of agg[0].  Our programs never run in
 * hard interrupts, so neither entry ever has two writers at once and plain
 * adds are exact (a lock-prefixed add costs several times more).  A run
 * interrupted between its load and store of depth sees the nested run undo
 * its own increment before it resumes.
 */
static __always_inline __u32 enter(void)
{
	struct pt_cpu *c = this_cpu();
	__u32 was;

	if (!c)
		return 0;
	was = c->depth;
	c->depth = was + 1;
	return was;
}

static __always_inline void leave(__u32 was)
{
	struct pt_cpu *c = this_cpu();

	if (c)
		c->depth = was;
}

static __always_inline struct pt_agg *agg_get(void)
{
	struct pt_cpu *c = this_cpu();
	__u32 entry = c && c->depth > 1 ? 1 : 0;

	return bpf_map_lookup_elem(&agg, &entry);
}

/* Each entry has one writer at a time: plain adds (see enter()). */
#define agg_add(p, v) (*(p) += (v))

/* The entry of the top-level hooks (accept, close, listen), which skip
 * enter()/leave() and add atomically (see stat_add_top()). */
static __always_inline struct pt_agg *agg_top(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&agg, &zero);
}

/* --- maps ---------------------------------------------------------------- */

/*
 * Macros rather than functions, so that they take the address of the
 * caller's own key (the code is then what it was before lifecycle.bpf.h):
 * key and lk are lvalues in every use.
 */
#define sock_lookup(key)	sock_find(key)
#define sock_update(key, rec)	sock_put(key, rec)
#define sock_delete(key)	sock_drop(key)
#define sock_written(key)	sock_wrote(key)
#define listener_lookup(lk)	bpf_map_lookup_elem(&listeners, lk)
#define listener_update(lk, tgid) bpf_map_update_elem(&listeners, lk, tgid, BPF_ANY)
#define listener_delete(lk)	bpf_map_delete_elem(&listeners, lk)
#define owner_listed(tgid)	(bpf_map_lookup_elem(&owners, &(tgid)) != NULL)

/*
 * A key is a cookie (or, with cfg.key_by_ptr, the sk pointer), with
 * PT_KEY_FRESH set by the state hooks when the socket had no cookie before
 * this event: nobody ever keyed it, so it has no record anywhere and its
 * birth looks nowhere.
 */
static __always_inline struct pt_slot *slot_of(__u64 key)
{
	__u32 i = key & ((1U << cfg.nursery_bits) - 1);

	return bpf_map_lookup_elem(&nursery, &i);
}

/* After a write to "socks" (see socks_gen).  An atomic add: any CPU. */
static __always_inline void socks_changed(void)
{
	__u32 zero = 0;
	__u64 *gen = bpf_map_lookup_elem(&socks_gen, &zero);

	if (gen)
		__sync_fetch_and_add(gen, 1);
}

/*
 * Without a nursery a key may be the sk pointer itself, which the verifier
 * forbids any arithmetic on (the masks below): only keys that are cookies,
 * that is with a nursery, are masked.
 */
static __always_inline struct pt_sock *sock_find(__u64 key)
{
	struct pt_slot *s;
	__u64 k;

	if (!cfg.nursery_bits)
		return bpf_map_lookup_elem(&socks, &key);
	k = key & ~PT_KEY_FRESH;
	s = slot_of(k);
	if (s && s->key == k)
		return &s->rec;
	if (key & PT_KEY_FRESH)
		return NULL;
	return bpf_map_lookup_elem(&socks, &k);
}

/* Insert or replace.  Nonzero when the record could not go in; a record
 * that could not move out of its slot is counted as a failed insert too. */
static __always_inline long sock_put(__u64 key, struct pt_sock *rec)
{
	struct pt_slot *s;
	struct pt_agg *a;
	__u64 k;

	if (!cfg.nursery_bits)
		return bpf_map_update_elem(&socks, &key, rec, BPF_ANY);
	k = key & ~PT_KEY_FRESH;
	s = slot_of(k);
	if (!s)
		return -1;
	if (s->key != k) {
		/* This socket's own earlier record (seeded, or moved out)
		 * is replaced, not kept beside the new one. */
		if (!(key & PT_KEY_FRESH) && !bpf_map_delete_elem(&socks, &k))
			socks_changed();
		if (s->key) {
			if (bpf_map_update_elem(&socks, &s->key, &s->rec, BPF_ANY)) {
				a = agg_get();
				if (a)
					agg_add(&a->stats[PT_S_INSERT_FAILED], 1);
			} else {
				socks_changed();
			}
		}
	}
	s->key = k;
	s->rec = *rec;
	return 0;
}

static __always_inline void sock_drop(__u64 key)
{
	struct pt_slot *s;
	__u64 k;

	if (!cfg.nursery_bits) {
		bpf_map_delete_elem(&socks, &key);
		return;
	}
	k = key & ~PT_KEY_FRESH;
	s = slot_of(k);
	if (s && s->key == k)
		s->key = 0;
	else if (!(key & PT_KEY_FRESH) && !bpf_map_delete_elem(&socks, &k))
		socks_changed();
}

/* The record sock_find() gave for key was written in place: if it lives in
 * "socks", say so now that the writes are done. */
static __always_inline void sock_wrote(__u64 key)
{
	struct pt_slot *s;
	__u64 k;

	if (!cfg.nursery_bits)
		return;
	k = key & ~PT_KEY_FRESH;
	s = slot_of(k);
	if (!s || s->key != k)
		socks_changed();
}

/* A child's birth, kept in this CPU's slot (see "percpu"). */
static __always_inline void embryo_keep(struct sock *sk, __u64 born_ns)
{
	struct pt_cpu *c = this_cpu();

	if (c) {
		c->child_sk = (__u64)sk;
		c->child_ns = born_ns;
	}
}

static __always_inline bool embryo_take(struct sock *sk, __u64 *born_ns)
{
	struct pt_cpu *c = this_cpu();

	if (!c || c->child_sk != (__u64)sk)
		return false;
	*born_ns = c->child_ns;
	c->child_sk = 0;
	return true;
}

/* --- socket facts -------------------------------------------------------- */

static __always_inline __u64 key_btf(struct sock *sk)
{
	if (cfg.key_by_ptr)
		return (__u64)sk;
	return bpf_get_socket_cookie(sk);
}

/* The state hooks' key: with a nursery, PT_KEY_FRESH when the cookie is
 * made now (only the nursery's accessors know to mask it off). */
static __always_inline __u64 key_state(struct sock *sk)
{
	__u64 raw;

	if (!cfg.nursery_bits)
		return key_btf(sk);
	raw = sk->__sk_common.skc_cookie.counter;
	if (raw)
		return raw;
	return bpf_get_socket_cookie(sk) | PT_KEY_FRESH;
}

/* Without a BTF pointer the helper is not callable: read the cookie the
 * helper (or sock_diag) already stored.  0 means nobody generated one. */
static __always_inline __u64 key_raw(struct sock *sk)
{
	if (cfg.key_by_ptr)
		return (__u64)sk;
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

static __always_inline bool is_tcp(struct sock *sk)
{
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	if (family != AF_INET && family != AF_INET6)
		return false;
	return sk_protocol_of(sk) == IPPROTO_TCP;
}

/*
 * Socket facts for a record.  `btf` is a compile-time constant: programs
 * with BTF pointers (tp_btf, fentry) load fields directly, which the JIT
 * turns into plain guarded loads; kprobe and tracepoint programs go
 * through bpf_probe_read_kernel().  The walk to the inode is for sockets
 * that already have a struct socket (connect, listen).
 */
static __always_inline void read_addrs(struct pt_sock *rec, struct sock *sk,
				       bool btf)
{
	if (btf) {
		rec->family = sk->__sk_common.skc_family;
		rec->lport = sk->__sk_common.skc_num;
		rec->rport = bpf_ntohs(sk->__sk_common.skc_dport);
		if (rec->family == AF_INET) {
			*(__u32 *)rec->laddr = sk->__sk_common.skc_rcv_saddr;
			*(__u32 *)rec->raddr = sk->__sk_common.skc_daddr;
		} else {
			__builtin_memcpy(rec->laddr, &sk->__sk_common.skc_v6_rcv_saddr, 16);
			__builtin_memcpy(rec->raddr, &sk->__sk_common.skc_v6_daddr, 16);
		}
		return;
	}
	rec->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	rec->lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	rec->rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (rec->family == AF_INET) {
		bpf_core_read(rec->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_core_read(rec->raddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_core_read(rec->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_core_read(rec->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

static __always_inline __u32 netns_of(struct sock *sk, bool btf)
{
	if (btf)
		return sk->__sk_common.skc_net.net->ns.inum;
	return BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
}

static __always_inline __u64 sk_ino(struct sock *sk, bool btf)
{
	if (btf)
		return sk->sk_socket->file->f_inode->i_ino;
	return BPF_CORE_READ(sk, sk_socket, file, f_inode, i_ino);
}

/* --- idle before end ----------------------------------------------------- */

#define svc_slot(k)		bpf_map_lookup_elem(&svc_ports, k)

/* The entry of this run, nested or not (see agg_get()). */
static __always_inline struct pt_svc *svc_get(__u32 slot)
{
	struct pt_cpu *c = this_cpu();
	__u32 idx = slot + (c && c->depth > 1 ? PT_SVC_SLOTS : 0);

	return bpf_map_lookup_elem(&svc, &idx);
}

/* --- the process tree (tracer run) -------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pt_tree);
} tree SEC(".maps");

#define PT_HAVE_FOLLOW		1
#define owner_add(tgid)		bpf_map_update_elem(&owners, &(tgid), &(__u8){1}, BPF_ANY)
#define owner_remove(tgid)	bpf_map_delete_elem(&owners, &(tgid))

static __always_inline struct pt_tree *tree_counts(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tree, &zero);
}

struct pt_end_facts;
static __always_inline void read_end_facts(struct sock *sk,
					   struct pt_end_facts *f, bool btf);

/*
 * When a transition happens.  bpf_ktime_get_ns() is a helper call, and the
 * largest single cost of a run here (25-35 ns of ~120; bench/notes.md).
 * The kernel stamps a tcp_sock with the same clock (tcp_mstamp_refresh():
 * ktime_get_ns(), CLOCK_MONOTONIC) as it starts to handle each segment it
 * receives: tcp_rcv_established() at its start, tcp_rcv_state_process() for
 * every state but LISTEN and CLOSE.  The transitions below are made only
 * later in that handling, on v5.10, v6.1, v6.12 and v6.18 alike, so the
 * stamp is now to within it; tests/kernel/test_clock.py checks each against
 * the test's clock after a quiet second.  The others are also made by
 * system calls (close(), connect(), shutdown(), SOCK_DESTROY), by ICMP
 * errors, or with no segment at all, where the stamp is the socket's last
 * activity: they read the clock.  So does SYN_SENT -> ESTABLISHED under
 * TCP_REPAIR, which connect() makes before any stamp: a stamp that is not
 * after `since`, the state's own start, was not made on the way here.
 * The stamp is tcp_clock_cache, in ns since v4.20: older than any kernel
 * the BTF programs that read it load on (v5.5).
 */
static __always_inline bool stamped_by_receive(int old, int new)
{
	return (new == TCP_ESTABLISHED &&
		(old == TCP_SYN_SENT || old == TCP_SYN_RECV)) ||
	       (old == TCP_ESTABLISHED && new == TCP_CLOSE_WAIT) ||
	       (old == TCP_FIN_WAIT1 &&
		(new == TCP_FIN_WAIT2 || new == TCP_CLOSING));
}

static __always_inline __u64 transition_ns(struct sock *sk, int old, int new,
					   __u64 since, bool btf)
{
	struct tcp_sock *tp;
	__u64 stamp;

	if (!btf || !stamped_by_receive(old, new))
		return bpf_ktime_get_ns();
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return bpf_ktime_get_ns();
	stamp = tp->tcp_clock_cache;
	return stamp > since ? stamp : bpf_ktime_get_ns();
}

#include "lifecycle.bpf.h"

/* Once per connection, at its end.  `btf`: direct loads, as read_addrs(). */
static __always_inline void read_end_facts(struct sock *sk,
					   struct pt_end_facts *f, bool btf)
{
	struct inet_connection_sock *icsk = (void *)sk;
	struct tcp_sock *tp = (void *)sk;

	/* A BTF struct sock pointer reaches its tcp_sock only through the
	 * helper's checked cast (v5.9); then the loads are direct. */
	if (btf) {
		struct tcp_sock *t = bpf_skc_to_tcp_sock(sk);

		if (!t)
			return;
		f->lrcvtime = t->inet_conn.icsk_ack.lrcvtime;
		f->lsndtime = t->lsndtime;
		f->rcv_tstamp = t->rcv_tstamp;
		f->err = t->inet_conn.icsk_inet.sk.sk_err;
		f->probes_out = t->inet_conn.icsk_probes_out;
		f->retransmits = t->inet_conn.icsk_retransmits;
		return;
	}
	f->lrcvtime = BPF_CORE_READ(icsk, icsk_ack.lrcvtime);
	f->lsndtime = BPF_CORE_READ(tp, lsndtime);
	f->rcv_tstamp = BPF_CORE_READ(tp, rcv_tstamp);
	f->err = BPF_CORE_READ(sk, sk_err);
	f->probes_out = BPF_CORE_READ(icsk, icsk_probes_out);
	f->retransmits = BPF_CORE_READ(icsk, icsk_retransmits);
}

/* --- state change -------------------------------------------------------- */

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(state_tp_btf, struct sock *sk, int old, int new)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (!cfg.key_by_ptr && old == TCP_LISTEN && new == TCP_SYN_RECV) {
		/* Not the child's final cookie yet: see "percpu". */
		embryo_keep(sk, bpf_ktime_get_ns());
		return 0;
	}
	handle_state(sk, key_state(sk), old, new, true);
	return 0;
}

SEC("tracepoint/sock/inet_sock_set_state")
int state_tracepoint(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;

	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	handle_state(sk, key_raw(sk), ctx->oldstate, ctx->newstate, false);
	return 0;
}

SEC("fentry/tcp_set_state")
int BPF_PROG(state_fentry, struct sock *sk, int state)
{
	handle_state(sk, key_state(sk), sk->__sk_common.skc_state, state, true);
	return 0;
}

SEC("kprobe/tcp_set_state")
int BPF_KPROBE(state_kprobe, struct sock *sk, int state)
{
	handle_state(sk, key_raw(sk), BPF_CORE_READ(sk, __sk_common.skc_state),
		     state, false);
	return 0;
}

/* --- passive-open owner -------------------------------------------------- */

SEC("fexit/inet_csk_accept")
int BPF_PROG(accept_fexit)
{
	struct sock *sk = accept_ret_of(ctx);

	if (sk && is_tcp(sk))
		handle_accept(sk, key_raw(sk), -1, 0);
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(accept_kretprobe, struct sock *sk)
{
	if (sk && is_tcp(sk))
		handle_accept(sk, key_raw(sk), -1, 0);
	return 0;
}

/* --- listen (for the tcp_set_state() hooks) ----------------------------- */

/*
 * listen() moves a socket to LISTEN with inet_sk_state_store(), which the
 * tcp_set_state() hooks never see; the tracepoint modes need none of this.
 * inet_csk_listen_start() puts the socket back to CLOSE when it fails, so
 * on return the state says whether it listens.
 */
SEC("fexit/inet_csk_listen_start")
int BPF_PROG(listen_fexit, struct sock *sk)
{
	if (sk->__sk_common.skc_state == TCP_LISTEN && is_tcp(sk))
		handle_state(sk, key_state(sk), TCP_CLOSE, TCP_LISTEN, true);
	return 0;
}

/* kretprobe sees no arguments: the socket waits here, by thread. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u64);
} listening SEC(".maps");

SEC("kprobe/inet_csk_listen_start")
int BPF_KPROBE(listen_kprobe, struct sock *sk)
{
	__u64 tid = bpf_get_current_pid_tgid(), ptr = (__u64)sk;

	if (bpf_map_update_elem(&listening, &tid, &ptr, BPF_ANY))
		stat_add_top(agg_top(), PT_S_INSERT_FAILED);
	return 0;
}

SEC("kretprobe/inet_csk_listen_start")
int BPF_KRETPROBE(listen_kretprobe, int ret)
{
	__u64 tid = bpf_get_current_pid_tgid();
	__u64 *ptr = bpf_map_lookup_elem(&listening, &tid);
	struct sock *sk;

	if (!ptr)
		return 0;
	sk = (struct sock *)*ptr;
	bpf_map_delete_elem(&listening, &tid);
	if (ret == 0 && is_tcp(sk))
		handle_state(sk, key_raw(sk), TCP_CLOSE, TCP_LISTEN, false);
	return 0;
}

/* Syscall tracepoint layouts: common header, syscall nr, then the args. */
struct sys_exit_ctx {
	__u64 unused;
	long nr;
	long ret;
};

struct sys_enter_ctx {
	__u64 unused;
	long nr;
	unsigned long args[6];
};

/*
 * fd -> file of the current task, if the fd is a socket.  From v5.11
 * (bpf_get_current_task_btf) the walk to the fd array is plain BTF loads;
 * before, and for the rest, one bpf_probe_read_kernel() per pointer.
 */
static __always_inline struct file *socket_file_of_fd(long fd)
{
	struct file **fds;
	struct file *file = NULL;
	unsigned int max_fds;
	umode_t mode;

	if (fd < 0)
		return NULL;
	if (bpf_core_enum_value_exists(enum bpf_func_id,
				       BPF_FUNC_get_current_task_btf)) {
		struct fdtable *fdt = bpf_get_current_task_btf()->files->fdt;

		max_fds = fdt->max_fds;
		fds = fdt->fd;
	} else {
		struct task_struct *task = (void *)bpf_get_current_task();
		struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);

		if (!fdt)
			return NULL;
		max_fds = BPF_CORE_READ(fdt, max_fds);
		fds = BPF_CORE_READ(fdt, fd);
	}
	if (fd >= max_fds)
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	mode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((mode & S_IFMT) != S_IFSOCK)
		return NULL;
	return file;
}

/* The sock of a socket file (file->private_data is its struct socket). */
static __always_inline struct sock *sock_of_file(struct file *file)
{
	struct socket *sock = BPF_CORE_READ(file, private_data);

	return BPF_CORE_READ(sock, sk);
}

static __always_inline int accept_exit(struct sys_exit_ctx *ctx)
{
	struct file *file = socket_file_of_fd(ctx->ret);
	struct sock *sk;

	if (!file)
		return 0;
	sk = sock_of_file(file);
	if (sk && is_tcp(sk))
		handle_accept(sk, key_raw(sk), ctx->ret,
			      BPF_CORE_READ(file, f_inode, i_ino));
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int accept4_sys_exit(struct sys_exit_ctx *ctx)
{
	return accept_exit(ctx);
}

SEC("tracepoint/syscalls/sys_exit_accept")
int accept_sys_exit(struct sys_exit_ctx *ctx)
{
	return accept_exit(ctx);
}

/* --- application close --------------------------------------------------- */

SEC("fentry/tcp_close")
int BPF_PROG(close_fentry, struct sock *sk)
{
	handle_close(key_btf(sk));
	return 0;
}

SEC("kprobe/tcp_close")
int BPF_KPROBE(close_kprobe, struct sock *sk)
{
	handle_close(key_raw(sk));
	return 0;
}

/*
 * Without a tcp_close() hook: close(fd) on a TCP socket.  Transitions to
 * FIN_WAIT1/LAST_ACK (only tcp_close/tcp_shutdown make them) and process
 * exit are caught in handle_state(); what is left is closing a socket that
 * is already CLOSE, e.g. after the peer's RST.
 */
SEC("tracepoint/syscalls/sys_enter_close")
int close_sys_enter(struct sys_enter_ctx *ctx)
{
	struct file *file = socket_file_of_fd((long)(int)ctx->args[0]);
	struct sock *sk;

	if (!file)
		return 0;
	/* No protocol check: only TCP sockets have records, and the key
	 * (a cookie, or the sk pointer itself) of any other socket misses. */
	sk = sock_of_file(file);
	if (sk)
		handle_close(key_raw(sk));
	return 0;
}

/* --- reset received (optional, v6.10+) ----------------------------------- */

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(reset_tp_btf, struct sock *sk)
{
	handle_reset(key_btf(sk));
	return 0;
}

/* --- process tree (tracer run) ------------------------------------------ */

/*
 * `tracer run` follows the command's tree (follow_fork(), follow_exit() in
 * bpf/lifecycle.bpf.h).  The loader attaches these only for `tracer run`
 * (pytracer/kernel/hooks.py, FOLLOW), so plain --pid costs nothing.
 * Neither is a syscall tracepoint.
 */
/* From kernel_clone(), in the parent's context, before the child runs. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(fork_tp_btf, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid, ctgid = child->tgid;

	if (ctgid != ptgid)	/* not a new thread */
		follow_fork(ptgid, ctgid);
	return 0;
}

/* From do_exit(), after signal->live was decremented: 0 means this is the
 * process's last thread (the leader may exit before its other threads). */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(exit_tp_btf, struct task_struct *p)
{
	if (p->signal->live.counter == 0)
		follow_exit(p->tgid);
	return 0;
}

/*
 * Classic tracepoint twins: the fork event names the child by its pid
 * only, which for a new thread is a thread id; such an entry is taken out
 * when that thread exits (a tid is never another live process's tgid).
 */
SEC("tracepoint/sched/sched_process_fork")
int fork_tracepoint(struct trace_event_raw_sched_process_fork *ctx)
{
	follow_fork(bpf_get_current_pid_tgid() >> 32, ctx->child_pid);
	return 0;
}

SEC("tracepoint/sched/sched_process_exit")
int exit_tracepoint(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct task_struct *task = (void *)bpf_get_current_task();

	if ((__u32)id != (__u32)(id >> 32))
		follow_exit((__u32)id);
	if (BPF_CORE_READ(task, signal, live.counter) == 0)
		follow_exit(id >> 32);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
