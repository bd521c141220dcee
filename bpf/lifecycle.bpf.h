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
 *     enter(), leave(was)      bracket a state change
 *   maps
 *     sock_lookup(key)         struct pt_sock * in the table, or NULL
 *     sock_update(key, rec)    insert or replace; nonzero on failure
 *     sock_delete(key)         (a key is opaque here: the CO-RE file's
 *                              carry a flag for its nursery)
 *     sock_written(key)        the record sock_lookup(key) gave was
 *                              written in place (called after the writes)
 *     listener_lookup(lk)      __u32 * (the tgid) in "listeners", or NULL
 *     listener_update(lk, tgid)  nonzero on failure
 *     listener_delete(lk)
 *     owner_listed(tgid)       true if tgid is in "owners"
 *     embryo_take(sk, &born_ns)  true, and the child's SYN_RECV time, if an
 *                              embryo was kept for sk (then forget it)
 *   the process tree, for `tracer run` (only where PT_HAVE_FOLLOW is defined)
 *     owner_add(tgid)          put tgid in "owners"; nonzero on failure
 *     owner_remove(tgid)       take tgid out of "owners"; nonzero if absent
 *     tree_counts()            struct pt_tree * (followed, exited, full)
 *   socket facts (btf: a compile-time constant, true in programs that have
 *   BTF pointers; an accessor without such programs ignores it)
 *     read_addrs(rec, sk, btf) family, ports and addresses into rec
 *     netns_of(sk, btf)        network namespace inode
 *     sk_ino(sk, btf)          inode of the socket's file, or 0
 *   idle before end, per service (once per connection, at its end)
 *     PT_CFG_HZ                the kernel's HZ
 *     svc_slot(k)              __u32 * (the slot) in "svc_ports", or NULL
 *     svc_get(slot)            this run's struct pt_svc * for slot in "svc"
 *                              (one writer at a time, as agg_get()), or NULL
 *     read_end_facts(sk, f, btf)  the tcp_sock's clocks and errors into f
 *   time
 *     transition_ns(sk, old, new, since, btf)  when old -> new on sk, in a
 *                              state entered at since (0: unknown), happens
 *                              (ns, CLOCK_MONOTONIC: bpf_ktime_get_ns())
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

/*
 * End of a life: observe it, count it.  The caller deletes or reuses.  A
 * life ends when its socket reaches CLOSE (`dwell` false: it has just
 * entered it, and CLOSE has no time of its own), or, for a record whose
 * CLOSE was never seen, when the socket is born again (`dwell` true).
 */
static __always_inline void finish(struct pt_agg *a, struct pt_sock *rec,
				   __u64 now, bool dwell)
{
	__u32 st = rec->state & (PT_STATES - 1);
	__u32 dir = rec->direction & (PT_DIRS - 1);

	if (!rec->counted)
		return;
	if (dwell)
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
		 * rest would fill the table with sockets nobody asked for.
		 * Under the filter the map names no other listener (a birth
		 * is recorded, and seeding names a listener, only for a
		 * watched process), and a listener stays watched when the
		 * process that opened it exits: a daemon listens, forks and
		 * leaves, and its child serves on the socket it inherited. */
		if (PT_CFG_FILTER_OWNER && !rec->listener_tgid) {
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
	    !rec->app_closed) {
		rec->flags |= PT_F_PEER_FIN;
		rec->peer_fin_t = now >> 20;	/* for svc_end() */
	}
	/* Only tcp_close()/tcp_shutdown() send our FIN, in process context. */
	if (new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK)
		note_app_close(a, rec, bpf_get_current_pid_tgid() >> 32, now,
			       false);
}

static __always_inline void svc_end(struct sock *sk, struct pt_sock *rec,
				    __u64 now, bool btf);

/*
 * A connection is over when its socket reaches CLOSE: what follows is the
 * socket waiting for its last reference (an orphan is destroyed at once; a
 * socket the application still holds, after a reset say, when it closes
 * it).  So the record's life ends here, and the caller deletes it: no
 * destroy hook, and no record left behind in CLOSE.
 */
static __always_inline void end_life(struct pt_agg *a, struct sock *sk,
				     struct pt_sock *rec, __u64 now, bool btf)
{
	svc_end(sk, rec, now, btf);
	finish(a, rec, now, false);
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
	if (new != TCP_CLOSE && !insert(a, key, &rec))
		return;
	stat_add(a, PT_S_OPENED + PT_DIR_PASSIVE);
	count_entry(a, TCP_LISTEN, TCP_SYN_RECV);
	count_step(a, TCP_SYN_RECV, born_ns, new, now);
	if (new == TCP_CLOSE)	/* reset or aborted before its handshake ended */
		end_life(a, sk, &rec, now, btf);
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
	if (new == TCP_CLOSE) {	/* first and last sight at once */
		count_entry(a, old, new);
		end_life(a, sk, &rec, now, btf);
		return;
	}
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
	/* Only a child's first event after SYN_RECV can find an embryo, and
	 * a child that has one has no record yet. */
	if (!PT_CFG_KEY_BY_PTR && old == TCP_SYN_RECV) {
		__u64 born_ns;

		if (embryo_take(sk, &born_ns)) {
			child_birth(a, sk, key, new, born_ns,
				    transition_ns(sk, old, new, born_ns, btf),
				    btf);
			return;
		}
	}
	rec = sock_lookup(key);
	now = transition_ns(sk, old, new, rec ? rec->state_ns : 0, btf);
	dir = birth_direction(old, new, rec != NULL);
	if (dir >= 0) {
		if (rec) {	/* a reborn socket whose CLOSE we missed */
			svc_end(sk, rec, now, btf);
			finish(a, rec, now, true);
		}
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
	if (new == TCP_CLOSE) {
		end_life(a, sk, rec, now, btf);
		sock_delete(key);
		return;
	}
	sock_written(key);
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
	sock_written(key);
}

/* The application closes the socket under key; from a top-level hook. */
static __always_inline void handle_close(__u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = sock_lookup(key);
	if (rec && !rec->close_ns) {
		note_app_close(agg_top(), rec, bpf_get_current_pid_tgid() >> 32,
			       bpf_ktime_get_ns(), true);
		sock_written(key);
	}
}

static __always_inline void handle_reset(__u64 key)
{
	struct pt_sock *rec = sock_lookup(key);

	if (rec) {
		rec->flags |= PT_F_RESET;
		sock_written(key);
	}
}

/* --- idle before end, per service ---------------------------------------- */

/*
 * What the tcp_sock knows at the end.  The three clocks are tcp_jiffies32
 * stamps (jiffies, wrapping at 2^32), and each moves only on real traffic:
 *
 *   lrcvtime    icsk_ack.lrcvtime, the last segment with data received
 *               (tcp_event_data_recv(); a bare FIN, ACK or RST leaves it)
 *   lsndtime    tp->lsndtime, the last segment with data sent
 *               (tcp_event_data_sent(); a bare FIN or RST leaves it)
 *   rcv_tstamp  tp->rcv_tstamp, the last ACK tcp_ack() accepted: when the
 *               peer was last heard from (a RST never gets there)
 */
struct pt_end_facts {
	__u32 lrcvtime;
	__u32 lsndtime;
	__u32 rcv_tstamp;
	__s32 err;		/* sk->sk_err (ETIMEDOUT after a timeout) */
	__u8 probes_out;	/* keepalive or zero-window probes unanswered */
	__u8 retransmits;	/* RTO retransmissions unanswered */
};

#define PT_ETIMEDOUT		110

/* The later of two tcp_jiffies32 stamps. */
static __always_inline __u32 later_j(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0 ? a : b;
}

/* The service slot of a connection: the listener's port for an accepted
 * one, the peer's port for a connected one; 0 ("other") when user space
 * named neither.  A socket first seen mid-life tries both. */
static __always_inline __u32 service_of(struct pt_sock *rec)
{
	struct pt_svc_key k = {};
	__u32 *slot = NULL;

	if (rec->direction != PT_DIR_ACTIVE) {
		k.port = rec->lport;
		k.role = PT_ROLE_SERVER;
		slot = svc_slot(&k);
	}
	if (!slot && rec->direction != PT_DIR_PASSIVE) {
		k.port = rec->rport;
		k.role = PT_ROLE_CLIENT;
		slot = svc_slot(&k);
	}
	return slot && *slot < PT_SVC_SLOTS ? *slot : 0;
}

/* The i-th state a record entered (i < transitions), 0 when unknown. */
static __always_inline __u8 history_at(struct pt_sock *rec, __u32 i)
{
	__u64 idx = i & (PT_HISTORY - 1);

	opaque(idx);
	if (i >= rec->transitions || idx >= PT_HISTORY)
		return 0;
	return rec->history[idx];
}

/*
 * Who ended it.  A RST received is flagged by the reset hook; a timeout
 * leaves ETIMEDOUT in sk_err (until the application reads it) or probes and
 * retransmissions still unanswered; the peer's FIN is flagged by the
 * ESTABLISHED -> CLOSE_WAIT transition.  Left: the application closed.  It
 * closed with a FIN unless the socket went to CLOSE straight from a state
 * that still carried data, which only an abort does (tcp_close() with
 * unread data or SO_LINGER 0, tcp_disconnect(), tcp_abort(), SOCK_DESTROY).
 */
static __always_inline __u32 ender_of(struct pt_sock *rec,
				      struct pt_end_facts *f)
{
	__u8 prev = rec->transitions >= 2 ?
		history_at(rec, rec->transitions - 2) : 0;
	bool abrupt = rec->state == TCP_CLOSE &&
		(prev == TCP_ESTABLISHED || prev == TCP_CLOSE_WAIT ||
		 prev == TCP_SYN_SENT || prev == TCP_SYN_RECV);

	if (rec->flags & PT_F_RESET)
		return PT_END_RESET;
	if (f->err == PT_ETIMEDOUT ||
	    (abrupt && (f->probes_out || f->retransmits)))
		return PT_END_TIMEOUT;
	if (rec->flags & PT_F_PEER_FIN)
		return PT_END_PEER;
	return abrupt ? PT_END_ABORT : PT_END_LOCAL;
}

/* Did the connection ever carry data: was it established? */
static __always_inline bool was_established(struct pt_sock *rec)
{
	if (rec->direction == PT_DIR_UNKNOWN)
		return rec->state != TCP_SYN_SENT && rec->state != TCP_SYN_RECV;
	return history_at(rec, 0) == TCP_ESTABLISHED ||
	       history_at(rec, 1) == TCP_ESTABLISHED;
}

/*
 * How long the connection had carried no data when it ended.  The end is
 * the moment it stopped being a connection: the application's close, the
 * peer's FIN, or the move to CLOSE (RST, abort, timeout); the socket may be
 * destroyed much later (an application that closes a reset socket only when
 * it next looks at it).  The start is the last data either way, except
 * after a RST received or a timeout: there it is the last time the peer was
 * heard from, because the request that meets a dead flow is what draws the
 * reset and is no sign of life.  Clocks: the tcp_sock's are jiffies, ours
 * ns; both are read now, so the gap between them converts exactly.
 */
static __always_inline __u64 idle_ns(struct pt_sock *rec, __u32 ender,
				     struct pt_end_facts *f, __u64 now)
{
	__u32 now_j = (__u32)bpf_jiffies64(), last;
	__u64 end = now, idle, since_end;
	__u32 hz = PT_CFG_HZ ? PT_CFG_HZ : 250;

	if (ender == PT_END_RESET || ender == PT_END_TIMEOUT)
		last = later_j(f->lrcvtime, f->rcv_tstamp);
	else
		last = later_j(f->lrcvtime, f->lsndtime);
	if (ender == PT_END_LOCAL && rec->close_ns && rec->close_ns <= now)
		end = rec->close_ns;
	else if (ender == PT_END_PEER)
		end = now - ((__u64)((__u32)(now >> 20) - rec->peer_fin_t) << 20);
	else if (rec->state == TCP_CLOSE && rec->state_ns <= now)
		end = rec->state_ns;
	if ((__s32)(now_j - last) <= 0)
		return 0;
	idle = (__u64)(now_j - last) * 1000000000ULL / hz;
	since_end = now - end;
	return idle > since_end ? idle - since_end : 0;
}

static __always_inline void svc_observe(struct pt_hist *h, __u64 ns)
{
	__u64 us = ns / 1000;
	__u64 slot = hist_slot(us);

	opaque(slot);
	if (slot >= PT_HIST_SLOTS)
		return;
	agg_add(&h->slots[slot], 1);
	agg_add(&h->sum_us, us);
}

/*
 * A connection's end, once per socket: its lifetime and its idle before
 * end, by ender, into its service's histograms.  svc_get() hands out an
 * entry with one writer at a time, as agg_get() does, so agg_add() is
 * exact.
 */
static __always_inline void svc_end(struct sock *sk, struct pt_sock *rec,
				    __u64 now, bool btf)
{
	struct pt_end_facts f = {};
	struct pt_svc *s;
	__u32 ender;
	__u64 e;

	if (!rec->counted || rec->direction == PT_DIR_LISTEN)
		return;
	s = svc_get(service_of(rec));
	if (!s)
		return;
	agg_add(&s->ends, 1);
	if (rec->birth_ns && rec->birth_ns <= now)
		svc_observe(&s->lifetime, now - rec->birth_ns);
	if (!was_established(rec)) {
		agg_add(&s->no_idle, 1);
		return;
	}
	read_end_facts(sk, &f, btf);
	ender = ender_of(rec, &f);
	e = ender;
	opaque(e);
	if (e >= PT_ENDERS)
		return;
	svc_observe(&s->idle[e], idle_ns(rec, ender, &f, now));
	s->owner[e] = rec->owner_tgid ? rec->owner_tgid : rec->listener_tgid;
}

/* --- the process tree (tracer run) -------------------------------------- */

#ifdef PT_HAVE_FOLLOW
/*
 * `tracer run` follows the command's whole tree in the kernel: a process
 * forked by one in "owners" joins it before it can run any code, and a
 * process leaves it when its last thread exits (so a suite forking
 * thousands of processes fits the bounded map, and a recycled pid never
 * inherits membership).  Sockets already recorded keep their records: the
 * filter only decides births.  The fork and exit hooks run in process
 * context at the top level, so their counters are atomic adds on
 * agg_top() (see stat_add_top()).
 */
static __always_inline void follow_fork(__u32 parent_tgid, __u32 child)
{
	struct pt_tree *t;

	if (!owner_listed(parent_tgid))
		return;
	t = tree_counts();
	if (owner_add(child)) {
		stat_add_top(agg_top(), PT_S_FILTER_FULL);
		if (t)
			__sync_fetch_and_add(&t->full, 1);
		return;
	}
	if (t)
		__sync_fetch_and_add(&t->followed, 1);
}

static __always_inline void follow_exit(__u32 id)
{
	struct pt_tree *t;

	if (owner_remove(id))
		return;
	t = tree_counts();
	if (t)
		__sync_fetch_and_add(&t->exited, 1);
}
#endif /* PT_HAVE_FOLLOW */

#endif /* __LIFECYCLE_BPF_H */
