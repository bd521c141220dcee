// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * pytracer kernel side: one record per TCP socket, from birth to destroy,
 * and every aggregate (counters, transition matrix, lifetime and
 * time-in-state histograms) kept in the kernel.  User space only polls.
 *
 * Each hook has twins for different kernels; they all call one static
 * helper, and the loader switches the unused twins off before load
 * (bpf_program__set_autoload).  See pytracer/loader.py for the choice.
 *
 *   state change   tp_btf/inet_sock_set_state > tracepoint > fentry > kprobe
 *   accept owner   fexit/inet_csk_accept > kretprobe > sys_exit_accept{,4}
 *   connect owner  the CLOSE -> SYN_SENT transition runs in connect()
 *   listen         fexit/inet_csk_listen_start > kretprobe (only with the
 *                  tcp_set_state() hooks, which never see CLOSE -> LISTEN)
 *   app close      fentry/tcp_close > kprobe > sys_enter_close
 *   destroy        tp_btf/tcp_destroy_sock > tracepoint
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

/* Sized by the loader from --max-sockets before load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pt_sock);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PT_AGG_ENTRIES);
	__type(key, __u32);
	__type(value, struct pt_agg);
} agg SEC(".maps");

/* How many of our programs are running on this CPU (see agg_get). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} depth SEC(".maps");

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
 * Accepted children between their birth (LISTEN -> SYN_RECV) and their next
 * event, keyed by sk pointer.  inet_csk_clone_lock() reports SYN_RECV and
 * only then sets the child's cookie from the request socket (v5.10 .. v6.12
 * at least), so a cookie taken at SYN_RECV would not be the socket's cookie
 * for the rest of its life.  The record is made at the next event, under
 * the stable cookie, with the birth time kept here.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64);
} embryos SEC(".maps");

const volatile struct pt_config cfg = {};

/* --- aggregation --------------------------------------------------------- */

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
	__u32 zero = 0, *d = bpf_map_lookup_elem(&depth, &zero), was;

	if (!d)
		return 0;
	was = *d;
	*d = was + 1;
	return was;
}

static __always_inline void leave(__u32 was)
{
	__u32 zero = 0, *d = bpf_map_lookup_elem(&depth, &zero);

	if (d)
		*d = was;
}

static __always_inline struct pt_agg *agg_get(void)
{
	__u32 zero = 0, *d = bpf_map_lookup_elem(&depth, &zero);
	__u32 entry = d && *d > 1 ? 1 : 0;

	return bpf_map_lookup_elem(&agg, &entry);
}

/* Keep the compiler from folding a bounds check into a later access. */
#define opaque(x) asm volatile("" : "+r"(x))

#define agg_add(p, v) (*(p) += (v))

static __always_inline void stat_add(struct pt_agg *a, __u64 idx)
{
	opaque(idx);
	if (a && idx < PT_STATS)
		agg_add(&a->stats[idx], 1);
}

/*
 * The accept, close and listen hooks only ever run at the top level, in
 * process context: none of ours can be under them, and a run nested inside
 * them finishes before they resume.  So they skip enter()/leave() and bump
 * their one or two counters in agg[0] with an atomic add instead.
 */
static __always_inline struct pt_agg *agg_top(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&agg, &zero);
}

static __always_inline void stat_add_top(struct pt_agg *a, __u64 idx)
{
	opaque(idx);
	if (a && idx < PT_STATS)
		__sync_fetch_and_add(&a->stats[idx], 1);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

/* Log-linear slot of a duration in microseconds (see pytracer.h). */
static __always_inline __u64 hist_slot(__u64 us)
{
	__u64 p, slot;

	if (us < 4)
		return (__u32)us;
	p = log2_u64(us);
	slot = 4 * (p - 1) + ((us >> (p - 2)) & 3);
	return slot < PT_HIST_SLOTS ? slot : PT_HIST_SLOTS - 1;
}

static __always_inline void observe(struct pt_agg *a, __u64 hist, __u64 ns)
{
	__u64 us = ns / 1000;
	__u64 slot = hist_slot(us);

	opaque(slot);
	opaque(hist);
	if (!a || hist >= PT_HISTS || slot >= PT_HIST_SLOTS)
		return;
	agg_add(&a->hists[hist].slots[slot], 1);
	agg_add(&a->hists[hist].sum_us, us);
}

static __always_inline bool owner_wanted(__u32 tgid)
{
	if (!cfg.filter_owner)
		return true;
	return bpf_map_lookup_elem(&owners, &tgid) != NULL;
}

/* --- socket facts -------------------------------------------------------- */

static __always_inline __u64 key_btf(struct sock *sk)
{
	if (cfg.key_by_ptr)
		return (__u64)sk;
	return bpf_get_socket_cookie(sk);
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

/* The owner is whoever runs now: only call from connect/listen/accept. */
static __always_inline void set_owner(struct pt_sock *rec, __u32 tgid)
{
	rec->owner_tgid = tgid;
	rec->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(rec->owner_comm, sizeof(rec->owner_comm));
}

/* --- the lifecycle ------------------------------------------------------- */

/* Which transitions start a socket's life, and in which direction. */
static __always_inline int birth_direction(int old, int new, bool known)
{
	if (old == TCP_CLOSE && new == TCP_SYN_SENT)
		return PT_DIR_ACTIVE;
	if (old == TCP_LISTEN && new == TCP_SYN_RECV)
		return PT_DIR_PASSIVE;
	if (old == TCP_CLOSE && new == TCP_LISTEN)
		return PT_DIR_LISTEN;
	/* tcp_set_state() hooks never see the child's birth, which goes
	 * through inet_sk_set_state(); its first tcp_set_state() is this. */
	if (!known && old == TCP_SYN_RECV && new == TCP_ESTABLISHED)
		return PT_DIR_PASSIVE;
	return -1;
}

/* End of a life: observe it, count it.  The caller deletes or reuses. */
static __always_inline void finish(struct pt_agg *a, struct pt_sock *rec,
				   __u64 now)
{
	__u32 st = rec->state & (PT_STATES - 1);
	__u32 dir = rec->direction & (PT_DIRS - 1);

	if (!rec->counted)
		return;
	observe(a, PT_HIST_STATE + st, now - rec->state_ns);
	stat_add(a, PT_S_LEFT + st);
	if (rec->birth_ns)
		observe(a, PT_HIST_LIFETIME + dir, now - rec->birth_ns);
	stat_add(a, PT_S_CLOSED + dir);
	stat_add(a, PT_S_DESTROYED);
}

static __always_inline void count_entry(struct pt_agg *a, int old, int new)
{
	__u64 n = new & (PT_STATES - 1);
	__u64 idx = (__u64)(old & (PT_STATES - 1)) * PT_STATES + n;

	stat_add(a, PT_S_ENTERED + n);
	opaque(idx);
	if (a && idx < PT_STATES * PT_STATES)
		agg_add(&a->transitions[0][0] + idx, 1);
}

/* Leaving `old` (entered at old_ns) for `new`: the aggregates' side. */
static __always_inline void count_step(struct pt_agg *a, int old, __u64 old_ns,
				       int new, __u64 now)
{
	__u32 o = old & (PT_STATES - 1);

	observe(a, PT_HIST_STATE + o, now - old_ns);
	stat_add(a, PT_S_LEFT + o);
	count_entry(a, old, new);
}

static __always_inline void note_app_close(struct pt_agg *a,
					   struct pt_sock *rec, __u32 tgid,
					   __u64 now, bool top)
{
	if (rec->close_ns)
		return;
	rec->close_ns = now;
	rec->closer_tgid = tgid;
	rec->app_closed = 1;
	if (top)
		stat_add_top(a, PT_S_APP_CLOSE);
	else
		stat_add(a, PT_S_APP_CLOSE);
}

/*
 * Fill a new record for a socket born now in direction `dir`, entering
 * `new`.  False when the owner filter rejects it (counted here).
 */
static __always_inline bool fill_birth(struct pt_agg *a, struct pt_sock *rec,
				       struct sock *sk, int dir, int new,
				       __u64 now, __u32 tgid, bool btf)
{
	rec->birth_ns = now;
	rec->state_ns = now;
	rec->state = new;
	rec->direction = dir;
	rec->owner_fd = -1;
	rec->transitions = 1;
	rec->history[0] = new;
	rec->netns_ino = netns_of(sk, btf);
	read_addrs(rec, sk, btf);
	if (dir == PT_DIR_PASSIVE) {
		struct pt_listen_key lk = {
			.netns_ino = rec->netns_ino,
			.port = rec->lport,
			.family = rec->family,
		};
		__u32 *ltgid = bpf_map_lookup_elem(&listeners, &lk);

		if (ltgid)
			rec->listener_tgid = *ltgid;
		/* Under --pid, keep only children of listeners we watch: the
		 * rest would fill the table with sockets nobody asked for. */
		if (cfg.filter_owner &&
		    !(rec->listener_tgid && owner_wanted(rec->listener_tgid))) {
			stat_add(a, PT_S_FILTER_SKIPPED);
			return false;
		}
	} else {
		/* connect() and listen() run in the owner's context. */
		if (!owner_wanted(tgid)) {
			stat_add(a, PT_S_FILTER_SKIPPED);
			return false;
		}
		set_owner(rec, tgid);
		rec->ino = sk_ino(sk, btf);
	}
	rec->counted = 1;
	return true;
}

static __always_inline bool insert(struct pt_agg *a, __u64 key,
				   struct pt_sock *rec)
{
	if (bpf_map_update_elem(&socks, &key, rec, BPF_ANY)) {
		stat_add(a, PT_S_INSERT_FAILED);
		return false;
	}
	return true;
}

static __always_inline void birth(struct pt_agg *a, struct sock *sk, __u64 key,
				  int dir, int old, int new, __u64 now, bool btf)
{
	struct pt_sock rec = {};
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	if (!fill_birth(a, &rec, sk, dir, new, now, tgid, btf))
		return;
	if (dir == PT_DIR_LISTEN) {
		struct pt_listen_key lk = {
			.netns_ino = rec.netns_ino,
			.port = rec.lport,
			.family = rec.family,
		};

		if (bpf_map_update_elem(&listeners, &lk, &tgid, BPF_ANY))
			stat_add(a, PT_S_LISTENER_FAILED);
	}
	if (!insert(a, key, &rec))
		return;
	stat_add(a, PT_S_OPENED + dir);
	count_entry(a, old, new);
}

/*
 * What a transition does to a record, whether it lives in the map or is
 * still being built on the stack.  The aggregates' side is count_step().
 */
static __always_inline void step(struct pt_agg *a, struct pt_sock *rec,
				 struct sock *sk, int old, int new, __u64 now,
				 bool btf)
{
	__u64 hist_idx;

	rec->state = new;
	rec->state_ns = now;
	hist_idx = rec->transitions & (PT_HISTORY - 1);
	opaque(hist_idx);
	if (hist_idx < PT_HISTORY)
		rec->history[hist_idx] = new;
	rec->transitions++;
	if (old == TCP_LISTEN && new == TCP_CLOSE) {
		struct pt_listen_key lk = {
			.netns_ino = rec->netns_ino,
			.port = rec->lport,
			.family = rec->family,
		};

		bpf_map_delete_elem(&listeners, &lk);
	}
	/* connect() binds the local port after CLOSE -> SYN_SENT; a child's
	 * peer address can arrive after its SYN_RECV. */
	if (!rec->lport || (!rec->rport && rec->direction != PT_DIR_LISTEN))
		read_addrs(rec, sk, btf);
	if (old == TCP_ESTABLISHED && new == TCP_CLOSE_WAIT &&
	    !rec->app_closed)
		rec->flags |= PT_F_PEER_FIN;
	/* Only tcp_close()/tcp_shutdown() send our FIN, in process context. */
	if (new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK)
		note_app_close(a, rec, bpf_get_current_pid_tgid() >> 32, now,
			       false);
}

/*
 * An accepted child's first event after SYN_RECV (see "embryos"): its birth
 * and this transition go into one new record, inserted once.
 */
static __always_inline void child_birth(struct pt_agg *a, struct sock *sk,
					__u64 key, int new, __u64 born_ns,
					__u64 now, bool btf)
{
	struct pt_sock rec = {};

	if (!fill_birth(a, &rec, sk, PT_DIR_PASSIVE, TCP_SYN_RECV, born_ns, 0,
			btf))
		return;
	step(a, &rec, sk, TCP_SYN_RECV, new, now, btf);
	if (!insert(a, key, &rec))
		return;
	stat_add(a, PT_S_OPENED + PT_DIR_PASSIVE);
	count_entry(a, TCP_LISTEN, TCP_SYN_RECV);
	count_step(a, TCP_SYN_RECV, born_ns, new, now);
}

/* First sight of a socket that was born before we attached. */
static __always_inline void midlife(struct pt_agg *a, struct sock *sk,
				    __u64 key, int old, int new, __u64 now, bool btf)
{
	struct pt_sock rec = {};

	stat_add(a, PT_S_MIDLIFE);
	/* Under --pid nothing here names an owner: seeding at start covers
	 * the watched processes' pre-existing sockets. */
	if (cfg.filter_owner) {
		stat_add(a, PT_S_FILTER_SKIPPED);
		return;
	}
	rec.state_ns = now;
	rec.state = new;
	rec.direction = PT_DIR_UNKNOWN;
	rec.owner_fd = -1;
	rec.transitions = 1;
	rec.history[0] = new;
	rec.flags = PT_F_BIRTH_UNKNOWN;
	rec.counted = 1;
	rec.netns_ino = netns_of(sk, btf);
	read_addrs(&rec, sk, btf);
	if (insert(a, key, &rec))
		count_entry(a, old, new);
}

static __always_inline void do_state(struct sock *sk, __u64 key, int old,
				     int new, bool btf)
{
	struct pt_agg *a;
	struct pt_sock *rec;
	__u64 now;
	int dir;

	if (!key)
		return;
	a = agg_get();
	now = bpf_ktime_get_ns();
	/* Only a child's first event after SYN_RECV can find an embryo, and
	 * a child that has one has no record yet. */
	if (!cfg.key_by_ptr && old == TCP_SYN_RECV) {
		__u64 ptr = (__u64)sk;
		__u64 *born = bpf_map_lookup_elem(&embryos, &ptr);

		if (born) {
			__u64 born_ns = *born;

			bpf_map_delete_elem(&embryos, &ptr);
			child_birth(a, sk, key, new, born_ns, now, btf);
			return;
		}
	}
	rec = bpf_map_lookup_elem(&socks, &key);
	dir = birth_direction(old, new, rec != NULL);
	if (dir >= 0) {
		if (rec)	/* a reused socket: the old life ends here */
			finish(a, rec, now);
		if (old != TCP_SYN_RECV) {
			birth(a, sk, key, dir, old, new, now, btf);
			return;
		}
		/* tcp_set_state() hooks: the child's LISTEN -> SYN_RECV went
		 * through inet_sk_set_state() while the kernel handled the
		 * very ACK that completes the handshake now (only a Fast Open
		 * child waits a round trip in SYN_RECV).  Record that birth,
		 * then this transition, as the tracepoint modes do. */
		child_birth(a, sk, key, new, now, now, btf);
		return;
	}
	if (!rec) {
		midlife(a, sk, key, old, new, now, btf);
		return;
	}
	if (rec->counted)
		count_step(a, rec->state, rec->state_ns, new, now);
	step(a, rec, sk, old, new, now, btf);
}

static __always_inline void handle_state(struct sock *sk, __u64 key, int old,
					 int new, bool btf)
{
	__u32 was = enter();

	do_state(sk, key, old, new, btf);
	leave(was);
}

static __always_inline void handle_accept(struct sock *sk, __u64 key, int fd,
					  __u64 ino)
{
	struct pt_agg *a = agg_top();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct pt_sock *rec;

	if (!key)
		return;
	rec = bpf_map_lookup_elem(&socks, &key);
	if (!rec) {
		if (owner_wanted(tgid))
			stat_add_top(a, PT_S_ACCEPT_UNTRACKED);
		return;
	}
	if (cfg.filter_owner && !owner_wanted(tgid)) {
		/* Not ours to watch: free the slot now. */
		if (!rec->counted)
			bpf_map_delete_elem(&socks, &key);
		return;
	}
	set_owner(rec, tgid);
	rec->owner_fd = fd;
	if (ino)
		rec->ino = ino;
	rec->accepted = 1;
	if (!rec->counted) {
		rec->counted = 1;
		/* A socket seeded mid-life was opened before we watched. */
		if (!(rec->flags & PT_F_BIRTH_UNKNOWN))
			stat_add_top(a, PT_S_OPENED + (rec->direction & (PT_DIRS - 1)));
		stat_add_top(a, PT_S_ENTERED + (rec->state & (PT_STATES - 1)));
	}
}

static __always_inline void handle_close(__u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = bpf_map_lookup_elem(&socks, &key);
	if (rec && !rec->close_ns)
		note_app_close(agg_top(), rec, bpf_get_current_pid_tgid() >> 32,
			       bpf_ktime_get_ns(), true);
}

static __always_inline void handle_reset(__u64 key)
{
	struct pt_sock *rec = bpf_map_lookup_elem(&socks, &key);

	if (rec)
		rec->flags |= PT_F_RESET;
}

static __always_inline void do_destroy(struct sock *sk, __u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = bpf_map_lookup_elem(&socks, &key);
	if (!rec) {
		/* A child destroyed before its first event after SYN_RECV. */
		if (!cfg.key_by_ptr) {
			__u64 ptr = (__u64)sk;

			bpf_map_delete_elem(&embryos, &ptr);
		}
		return;
	}
	finish(agg_get(), rec, bpf_ktime_get_ns());
	bpf_map_delete_elem(&socks, &key);
}

static __always_inline void handle_destroy(struct sock *sk, __u64 key)
{
	__u32 was = enter();

	do_destroy(sk, key);
	leave(was);
}

/* --- state change -------------------------------------------------------- */

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(state_tp_btf, struct sock *sk, int old, int new)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	if (!cfg.key_by_ptr && old == TCP_LISTEN && new == TCP_SYN_RECV) {
		/* Not the child's final cookie yet: see "embryos". */
		__u64 ptr = (__u64)sk, now = bpf_ktime_get_ns();

		if (bpf_map_update_elem(&embryos, &ptr, &now, BPF_ANY)) {
			__u32 was = enter();

			stat_add(agg_get(), PT_S_INSERT_FAILED);
			leave(was);
		}
		return 0;
	}
	handle_state(sk, key_btf(sk), old, new, true);
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
	handle_state(sk, key_btf(sk), sk->__sk_common.skc_state, state, true);
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
		handle_state(sk, key_btf(sk), TCP_CLOSE, TCP_LISTEN, true);
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

/* --- destroy ------------------------------------------------------------- */

SEC("tp_btf/tcp_destroy_sock")
int BPF_PROG(destroy_tp_btf, struct sock *sk)
{
	handle_destroy(sk, key_btf(sk));
	return 0;
}

SEC("tracepoint/tcp/tcp_destroy_sock")
int destroy_tracepoint(struct trace_event_raw_tcp_event_sk *ctx)
{
	handle_destroy((struct sock *)ctx->skaddr, key_raw((struct sock *)ctx->skaddr));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
