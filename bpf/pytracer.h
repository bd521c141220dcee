/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * The ABI shared by the BPF programs and the Python loader.
 *
 * Python mirrors every struct and constant here exactly once, in
 * pytracer/abi.py, and tests/unit/kernel/test_abi.py checks the sizes and offsets
 * against the BTF of the compiled object.  Change both together.
 */
#ifndef __PYTRACER_H
#define __PYTRACER_H

/* Per-socket state history kept in the record. */
#define PT_HISTORY		16

/* TCP states run 1..13 (include/net/tcp_states.h); 16 leaves headroom. */
#define PT_STATES		16

/*
 * Histogram slots: log-linear, four sub-buckets per power of two, over
 * microseconds.  Values 0..3 us have a slot each; from 4 us on, slot
 * 4 * (log2(v) - 1) + the two bits below the leading one.  160 slots reach
 * 2^41 us (25 days); anything longer lands in the last slot.
 */
#define PT_HIST_SLOTS		160

/* Histogram indexes in pt_agg.hists. */
#define PT_HIST_LIFETIME	0			/* + direction */
#define PT_HIST_STATE		4			/* + state */
#define PT_HISTS		(PT_HIST_STATE + PT_STATES)

/* Socket directions (pt_sock.direction); lifetime histogram index too. */
enum pt_direction {
	PT_DIR_ACTIVE	= 0,	/* connect() */
	PT_DIR_PASSIVE	= 1,	/* accepted from a listener */
	PT_DIR_LISTEN	= 2,	/* a listener itself */
	PT_DIR_UNKNOWN	= 3,	/* first seen mid-life */
	PT_DIRS		= 4,
};

/*
 * pt_sock.flags, written only from the socket's own state path (which the
 * socket lock serialises).  Facts written from other contexts (accept,
 * close) have a byte of their own, because the oldest supported kernels
 * have no atomic OR for BPF (it arrived with -mcpu=v3 in v5.12).
 */
#define PT_F_BIRTH_UNKNOWN	(1 << 0)  /* first seen mid-life (pre-existing) */
#define PT_F_PEER_FIN		(1 << 1)  /* the peer's FIN came first */
#define PT_F_RESET		(1 << 2)  /* a RST was received */
#define PT_F_SEEDED		(1 << 3)  /* seeded from the socket inventory */

/* Counters in pt_agg.stats.  All only ever go up. */
enum pt_stat {
	PT_S_OPENED		= 0,	/* + direction */
	PT_S_CLOSED		= 4,	/* + direction */
	PT_S_ENTERED		= 8,	/* + state: transitions into a state */
	PT_S_LEFT		= 24,	/* + state: transitions out, or destroy */
	PT_S_INSERT_FAILED	= 40,	/* socks map full or out of memory */
	PT_S_FILTER_SKIPPED	= 41,	/* sockets of processes not in --pid */
	PT_S_MIDLIFE		= 42,	/* sockets first seen mid-life */
	PT_S_ACCEPT_UNTRACKED	= 43,	/* accept() of a socket with no record */
	PT_S_APP_CLOSE		= 44,	/* close() of a tracked socket */
	PT_S_DESTROYED		= 45,	/* tracked sockets destroyed */
	PT_S_FILTER_FULL	= 46,	/* owner filter insert failed */
	PT_S_LISTENER_FAILED	= 47,	/* listeners map full */
	PT_STATS		= 48,
};

/* The per-socket record, the value of the "socks" hash (key: u64 id). */
struct pt_sock {
	__u64 birth_ns;		/* CLOCK_MONOTONIC; 0 when birth is unknown */
	__u64 state_ns;		/* when the current state was entered */
	__u64 close_ns;		/* when the application closed it, or 0 */
	__u64 cgroup_id;	/* cgroup v2 id of the owner */
	__u64 ino;		/* socket inode, matches /proc/PID/fd links */
	__u32 netns_ino;
	__u32 owner_tgid;	/* the process that connected or accepted */
	__u32 closer_tgid;
	__s32 owner_fd;		/* fd accept() returned, or -1 */
	__u32 listener_tgid;	/* passive: who listened on the port */
	__u32 peer_fin_t;	/* when the peer's FIN came, in units of 2^20 ns
				 * of CLOCK_MONOTONIC (wraps: compare mod 2^32) */
	__u16 transitions;
	__u8 state;
	__u8 direction;		/* enum pt_direction */
	__u8 flags;		/* PT_F_* */
	__u8 counted;		/* counts toward states and histograms */
	__u8 accepted;		/* accept() handed it to a process */
	__u8 app_closed;	/* the application closed it */
	__u16 family;		/* AF_INET or AF_INET6 */
	__u16 lport;		/* host byte order */
	__u16 rport;
	__u16 pad;
	__u8 laddr[16];		/* IPv4 in the first 4 bytes */
	__u8 raddr[16];
	char owner_comm[16];
	/* States entered, in order: history[i % PT_HISTORY] for the i-th
	 * transition (transitions counts them all). */
	__u8 history[PT_HISTORY];
};

/* Key of the "listeners" map: who listens where, to attribute children. */
struct pt_listen_key {
	__u32 netns_ino;
	__u16 port;
	__u16 family;
};

/* One histogram: slot counts and the sum of observed microseconds. */
struct pt_hist {
	__u64 slots[PT_HIST_SLOTS];
	__u64 sum_us;
};

/*
 * Everything the kernel aggregates, in the per-CPU "agg" array, so each
 * event costs one lookup.  Entry 0 takes the runs that started while none
 * of our programs was running on that CPU; entry 1 the runs nested inside
 * one (a softirq interrupting a program in process context).  Each entry
 * then has one writer at a time and takes plain, non-atomic adds.  Readers
 * sum every CPU of every entry that exists (the bcc backend has only 0).
 */
#define PT_AGG_ENTRIES		2

struct pt_agg {
	__u64 stats[PT_STATS];
	__u64 transitions[PT_STATES][PT_STATES];	/* [old][new] */
	struct pt_hist hists[PT_HISTS];
};

/* Configuration, set by the loader before load (.rodata). */
struct pt_config {
	__u8 filter_owner;	/* only count sockets of tgids in "owners" */
	__u8 key_by_ptr;	/* key records by sk pointer, not cookie */
	__u16 hz;		/* the kernel's HZ, to turn jiffies into ns */
	__u8 nursery_bits;	/* log2 of the nursery's slots; 0: none */
	__u8 pad[3];
};

/* A nursery slot (CO-RE build): the record of the socket whose cookie is
 * key, or free (key 0).  See "nursery" in pytracer.bpf.c. */
struct pt_slot {
	__u64 key;
	struct pt_sock rec;
};

/* Set in a state hook's key when the socket's cookie was made by that event. */
#define PT_KEY_FRESH	(1ULL << 63)

/*
 * Idle before end, per service.  At a connection's end the kernel works out
 * who ended it and how long it had carried no data, and adds both, with its
 * lifetime, to the histograms of its service.  Nothing here runs per event:
 * see svc_end() in lifecycle.bpf.h.
 */

/* Who ended a connection: the index of pt_svc.idle. */
enum pt_ender {
	PT_END_LOCAL	= 0,	/* the local application closed first (FIN) */
	PT_END_PEER	= 1,	/* the peer's FIN came first */
	PT_END_RESET	= 2,	/* a RST was received */
	PT_END_ABORT	= 3,	/* the local side aborted: sent a RST */
	PT_END_TIMEOUT	= 4,	/* keepalive or retransmission timeout */
	PT_ENDERS	= 5,
};

/* Service slots: 0 is "other", the rest are given out by user space. */
#define PT_SVC_SLOTS		16

/* Which port names the service: the listener's (accepted sockets) or the
 * peer's (connected sockets). */
enum pt_svc_role {
	PT_ROLE_SERVER	= 0,
	PT_ROLE_CLIENT	= 1,
};

/* Key of the "svc_ports" map (value: __u32 slot, 1 .. PT_SVC_SLOTS - 1). */
struct pt_svc_key {
	__u16 port;
	__u8 role;		/* enum pt_svc_role */
	__u8 pad;
};

/* One service's aggregates: the value of the per-CPU "svc" array. */
struct pt_svc {
	__u64 ends;		/* connections ended (slot 0: folded into other) */
	__u64 no_idle;		/* ended without ever carrying data (never
				 * established): no idle figure */
	__u32 owner[PT_ENDERS + 1];	/* tgid of the last one ended, by ender */
	struct pt_hist lifetime;
	struct pt_hist idle[PT_ENDERS];	/* idle before end, by ender */
};

/*
 * Following a process tree (`tracer run`): the "tree" array's one value.
 * Its programs (sched_process_fork, sched_process_exit) are attached only
 * for `tracer run`; every count only goes up.
 */
struct pt_tree {
	__u64 followed;		/* forks whose child joined "owners" */
	__u64 exited;		/* processes that left "owners" when their last thread exited */
	__u64 full;		/* children not followed: "owners" full */
};

#endif /* __PYTRACER_H */
