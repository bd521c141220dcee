/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The TCP socket lifecycle, written once for both kernel programs:
 * bpf/pytracer.bpf.c (libbpf CO-RE) and bpf/pytracer_bcc.c (compiled by bcc
 * against kernel headers).  Births, transitions, ends, the per-socket record,
 * the counters, the transition matrix and the histograms are all here; each
 * program file keeps only its maps, how it reads the kernel, and its hooks.
 *
 * This file touches neither a map nor kernel memory itself.  bcc rewrites
 * map calls (socks.lookup()) and kernel dereferences only in its main file,
 * so every map operation and every read of a struct sock goes through an
 * accessor the including file defines first:
 *
 *   configuration (compile-time or load-time constants)
 *     PT_CFG_FILTER_OWNER      count only sockets of tgids in "owners"
 *     PT_CFG_KEY_BY_PTR        keys are sk pointers (no child embryos)
 *   aggregation
 *     agg_get()                this run's struct pt_agg * (may be NULL)
 *     agg_top()                the entry the top-level hooks (accept,
 *                              close, listen) write with atomic adds
 *     agg_add(p, v)            add v to the __u64 at p
 *     enter(), leave(was)      bracket a state change or a destroy
 *   maps
 *     sock_lookup(key)         struct pt_sock * in "socks", or NULL
 *     sock_update(key, rec)    insert or replace; nonzero on failure
 *     sock_delete(key)
 *     listener_lookup(lk)      __u32 * (the tgid) in "listeners", or NULL
 *     listener_update(lk, tgid)  nonzero on failure
 *     listener_delete(lk)
 *     owner_listed(tgid)       true if tgid is in "owners"
 *     embryo_take(sk, &born_ns)  true, and the child's SYN_RECV time, if an
 *                              embryo was kept for sk (then forget it)
 *     embryo_drop(sk)          forget sk's embryo, if any
 *   socket facts (btf: a compile-time constant, true in programs that have
 *   BTF pointers; an accessor without such programs ignores it)
 *     read_addrs(rec, sk, btf) family, ports and addresses into rec
 *     netns_of(sk, btf)        network namespace inode
 *     sk_ino(sk, btf)          inode of the socket's file, or 0
 *
 * Include it after pytracer.h and the kernel types (struct sock, TCP_*).
 */
#ifndef __LIFECYCLE_BPF_H
#define __LIFECYCLE_BPF_H

/* Keep the compiler from folding a bounds check into a later access. */
#define opaque(x) asm volatile("" : "+r"(x))

/* --- aggregation --------------------------------------------------------- */

static __always_inline void stat_add(struct pt_agg *a, __u64 idx)
{
	opaque(idx);
	if (a && idx < PT_STATS)
		agg_add(&a->stats[idx], 1);
}

/*
 * The accept, close and listen hooks only ever run at the top level, in
 * process context: none of ours can be under them, and a run nested inside
 * them finishes before they resume.  They bump their one or two counters in
 * agg_top() with an atomic add, whatever agg_add() is.
 */
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
	if (!PT_CFG_FILTER_OWNER)
		return true;
	return owner_listed(tgid);
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

/*
 * Leaving `old` (entered at old_ns) for `new`: the aggregates' side.  The
 * caller passes the state the record was in, so the matrix row, the
 * time-in-state histogram and the "left" counter name the same state.
 */
static __always_inline void count_step(struct pt_agg *a, int old, __u64 old_ns,
				       int new, __u64 now)
{
	__u32 o = old & (PT_STATES - 1);

	observe(a, PT_HIST_STATE + o, now - old_ns);
	stat_add(a, PT_S_LEFT + o);
	count_entry(a, old, new);
}

/* `top`: called from a top-level hook (see stat_add_top). */
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
		__u32 *ltgid = listener_lookup(&lk);

		if (ltgid)
			rec->listener_tgid = *ltgid;
		/* Under --pid, keep only children of listeners we watch: the
		 * rest would fill the table with sockets nobody asked for. */
		if (PT_CFG_FILTER_OWNER &&
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
	if (sock_update(key, rec)) {
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

		if (listener_update(&lk, &tgid))
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

		listener_delete(&lk);
	}
	/* connect() binds the local port after CLOSE -> SYN_SENT.  And some
	 * kernels (seen on 6.1, not on 6.18) announce a child's SYN_RECV from
	 * inet_csk_clone_lock() before its peer's address and port are
	 * copied in, so a passive record read at birth may have no peer. */
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
 * An accepted child's birth (LISTEN -> SYN_RECV at born_ns) and its next
 * transition, to `new` now, go into one new record, inserted once.  Used for
 * an embryo's first event, and by the tcp_set_state() hooks, which see no
 * SYN_RECV (see do_state()).
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
	if (PT_CFG_FILTER_OWNER) {
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
	if (!PT_CFG_KEY_BY_PTR && old == TCP_SYN_RECV) {
		__u64 born_ns;

		if (embryo_take(sk, &born_ns)) {
			child_birth(a, sk, key, new, born_ns, now, btf);
			return;
		}
	}
	rec = sock_lookup(key);
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

/* A state change: old -> new on sk, whose record is under key (0: none). */
static __always_inline void handle_state(struct sock *sk, __u64 key, int old,
					 int new, bool btf)
{
	__u32 was = enter();

	do_state(sk, key, old, new, btf);
	leave(was);
}

/* accept() handed sk to the current process, as fd (or -1) with inode ino
 * (or 0); from a top-level hook. */
static __always_inline void handle_accept(struct sock *sk, __u64 key, int fd,
					  __u64 ino)
{
	struct pt_agg *a = agg_top();
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct pt_sock *rec;

	if (!key)
		return;
	rec = sock_lookup(key);
	if (!rec) {
		if (owner_wanted(tgid))
			stat_add_top(a, PT_S_ACCEPT_UNTRACKED);
		return;
	}
	if (PT_CFG_FILTER_OWNER && !owner_wanted(tgid)) {
		/* Not ours to watch: free the slot now. */
		if (!rec->counted)
			sock_delete(key);
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

/* The application closes the socket under key; from a top-level hook. */
static __always_inline void handle_close(__u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = sock_lookup(key);
	if (rec && !rec->close_ns)
		note_app_close(agg_top(), rec, bpf_get_current_pid_tgid() >> 32,
			       bpf_ktime_get_ns(), true);
}

static __always_inline void handle_reset(__u64 key)
{
	struct pt_sock *rec = sock_lookup(key);

	if (rec)
		rec->flags |= PT_F_RESET;
}

static __always_inline void do_destroy(struct sock *sk, __u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = sock_lookup(key);
	if (!rec) {
		/* A child destroyed before its first event after SYN_RECV. */
		if (!PT_CFG_KEY_BY_PTR)
			embryo_drop(sk);
		return;
	}
	finish(agg_get(), rec, bpf_ktime_get_ns());
	sock_delete(key);
}

/* The end of sk, whose record is under key (0: none). */
static __always_inline void handle_destroy(struct sock *sk, __u64 key)
{
	__u32 was = enter();

	do_destroy(sk, key);
	leave(was);
}

#endif /* __LIFECYCLE_BPF_H */
