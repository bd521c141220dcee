// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * pytracer kernel side for the bcc backend: the lifecycle of
 * bpf/pytracer.bpf.c, compiled by bcc at start-up against the running
 * kernel's headers, for hosts without BTF.  pytracer/bcc_backend.py loads it.
 *
 * Same ABI (bpf/pytracer.h), same map names, types and layouts (socks, agg,
 * owners, listeners), so the poller, model, views and exporter read it
 * unchanged.  The "lifecycle" section below is the CO-RE program's, function
 * for function and line for line; only the kernel accessors around it
 * differ.  Differences from the CO-RE program:
 *
 *   - Records are always keyed by the sk pointer (pt_config.key_by_ptr = 1):
 *     kprobes and classic tracepoints cannot call bpf_get_socket_cookie().
 *     A reused pointer starts a new life at its birth transition, exactly as
 *     in the CO-RE program's key_by_ptr mode.
 *   - pt_config comes in as -D defines (PT_FILTER_OWNER, PT_MAX_SOCKETS),
 *     because bcc has no .rodata to set before load.
 *   - Programs exist only for hooks that need no BTF: tracepoint and kprobe.
 *     Tracepoint programs are compiled only when the tracepoint exists
 *     (PT_TP_* defines), since bcc builds their context struct from tracefs.
 *   - The optional reset hook is the classic tcp:tcp_receive_reset
 *     tracepoint (the CO-RE program uses its tp_btf twin).
 *   - Kernel memory is read with explicit bpf_probe_read_kernel() instead of
 *     CO-RE relocations; offsets come from the headers bcc compiles against.
 *   - A record's addresses are read again while its peer port is 0 (see
 *     handle_state()): on 6.1 a passive child is born before the kernel
 *     fills in its peer.
 *   - agg has only its entry 0, updated with atomic adds; the CO-RE
 *     program's second entry for nested runs (and its plain adds) is a cost
 *     optimisation, and readers sum whatever entries exist.
 *
 *   state change   tracepoint sock/inet_sock_set_state > kprobe tcp_set_state
 *   accept owner   kretprobe inet_csk_accept > sys_exit_accept{,4}
 *   connect owner  the CLOSE -> SYN_SENT transition runs in connect()
 *   app close      kprobe tcp_close > sys_enter_close
 *   destroy        tracepoint tcp/tcp_destroy_sock
 */
#include <uapi/linux/ptrace.h>
#include <linux/version.h>
#include <linux/fs.h>
#include <linux/fdtable.h>
#include <linux/sched.h>
#include <net/sock.h>
#include <net/inet_sock.h>
#include <net/net_namespace.h>
#include <net/tcp_states.h>
#include "pytracer.h"

#ifndef PT_MAX_SOCKETS
#define PT_MAX_SOCKETS		262144
#endif
#ifndef PT_FILTER_OWNER
#define PT_FILTER_OWNER		0
#endif

#define S_IFMT_		00170000
#define S_IFSOCK_	0140000

/* Read one kernel value into a local (or a record field). */
#define READ(dst, src) bpf_probe_read_kernel(&(dst), sizeof(dst), &(src))

/* Sized from --max-sockets by the loader (PT_MAX_SOCKETS). */
BPF_F_TABLE("hash", u64, struct pt_sock, socks, PT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

BPF_PERCPU_ARRAY(agg, struct pt_agg, 1);

/* Owner filter (--pid): tgids whose sockets are counted. */
BPF_HASH(owners, u32, u8, 1024);

/* Listening sockets' owners, so accepted children can be attributed (and
 * filtered) from birth, and never-accepted ones still name a process. */
BPF_HASH(listeners, struct pt_listen_key, u32, 16384);

/* --- aggregation --------------------------------------------------------- */

static __always_inline struct pt_agg *agg_get(void)
{
	int zero = 0;

	return agg.lookup(&zero);
}

/* Keep the compiler from folding a bounds check into a later access. */
#define opaque(x) asm volatile("" : "+r"(x))

static __always_inline void stat_add(struct pt_agg *a, u64 idx)
{
	opaque(idx);
	if (a && idx < PT_STATS)
		__sync_fetch_and_add(&a->stats[idx], 1);
}

static __always_inline u32 log2_u64(u64 v)
{
	u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

/* Log-linear slot of a duration in microseconds (see pytracer.h). */
static __always_inline u64 hist_slot(u64 us)
{
	u64 p, slot;

	if (us < 4)
		return (u32)us;
	p = log2_u64(us);
	slot = 4 * (p - 1) + ((us >> (p - 2)) & 3);
	return slot < PT_HIST_SLOTS ? slot : PT_HIST_SLOTS - 1;
}

static __always_inline void observe(struct pt_agg *a, u64 hist, u64 ns)
{
	u64 us = ns / 1000;
	u64 slot = hist_slot(us);

	opaque(slot);
	opaque(hist);
	if (!a || hist >= PT_HISTS || slot >= PT_HIST_SLOTS)
		return;
	__sync_fetch_and_add(&a->hists[hist].slots[slot], 1);
	__sync_fetch_and_add(&a->hists[hist].sum_us, us);
}

static __always_inline bool owner_wanted(u32 tgid)
{
	if (!PT_FILTER_OWNER)
		return true;
	return owners.lookup(&tgid) != NULL;
}

/* --- socket facts (the part that differs from CO-RE) --------------------- */

/* Always the pointer: see the header comment. */
static __always_inline u64 key_of(struct sock *sk)
{
	return (u64)sk;
}

static __always_inline u16 sk_protocol_of(struct sock *sk)
{
	u16 protocol = 0;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 6, 0)
	READ(protocol, sk->sk_protocol);
#else
	/* An 8-bit bitfield before v5.6 (commit bf9765145b85 "sock: Make
	 * sk_protocol a 16-bit value"): read the word that holds it. */
	u32 flags = 0;

	bpf_probe_read_kernel(&flags, sizeof(flags), &sk->__sk_flags_offset);
	protocol = (flags & SK_FL_PROTO_MASK) >> SK_FL_PROTO_SHIFT;
#endif
	return protocol;
}

static __always_inline bool is_tcp(struct sock *sk)
{
	u16 family = 0;

	READ(family, sk->__sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return false;
	return sk_protocol_of(sk) == IPPROTO_TCP;
}

static __always_inline int sk_state_of(struct sock *sk)
{
	unsigned char state = 0;

	READ(state, sk->__sk_common.skc_state);
	return state;
}

static __always_inline u32 sk_netns_ino(struct sock *sk)
{
	struct net *net = NULL;
	u32 inum = 0;

	READ(net, sk->__sk_common.skc_net.net);
	if (net)
		READ(inum, net->ns.inum);
	return inum;
}

static __always_inline void read_addrs(struct pt_sock *rec, struct sock *sk)
{
	u16 family = 0, lport = 0, dport = 0;

	READ(family, sk->__sk_common.skc_family);
	READ(lport, sk->__sk_common.skc_num);
	READ(dport, sk->__sk_common.skc_dport);
	rec->family = family;
	rec->lport = lport;
	rec->rport = ntohs(dport);
	if (family == AF_INET) {
		bpf_probe_read_kernel(rec->laddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_probe_read_kernel(rec->raddr, 4, &sk->__sk_common.skc_daddr);
	} else {
		bpf_probe_read_kernel(rec->laddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_probe_read_kernel(rec->raddr, 16, &sk->__sk_common.skc_v6_daddr);
	}
}

static __always_inline u64 file_ino(struct file *file)
{
	struct inode *inode = NULL;
	unsigned long ino = 0;

	if (!file)
		return 0;
	READ(inode, file->f_inode);
	if (inode)
		READ(ino, inode->i_ino);
	return ino;
}

static __always_inline u64 sk_socket_ino(struct sock *sk)
{
	struct socket *sock = NULL;
	struct file *file = NULL;

	READ(sock, sk->sk_socket);
	if (!sock)
		return 0;
	READ(file, sock->file);
	return file_ino(file);
}

/* The owner is whoever runs now: only call from connect/listen/accept. */
static __always_inline void set_owner(struct pt_sock *rec, u32 tgid)
{
	rec->owner_tgid = tgid;
	rec->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(rec->owner_comm, sizeof(rec->owner_comm));
}

/* --- the lifecycle (as in bpf/pytracer.bpf.c) ---------------------------- */

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
				   u64 now)
{
	u32 st = rec->state & (PT_STATES - 1);
	u32 dir = rec->direction & (PT_DIRS - 1);

	if (!rec->counted)
		return;
	observe(a, PT_HIST_STATE + st, now - rec->state_ns);
	stat_add(a, PT_S_LEFT + st);
	if (rec->birth_ns)
		observe(a, PT_HIST_LIFETIME + dir, now - rec->birth_ns);
	stat_add(a, PT_S_CLOSED + dir);
	stat_add(a, PT_S_DESTROYED);
}

static __always_inline void count_entry(struct pt_agg *a, struct pt_sock *rec,
					int old, int new)
{
	u64 n = new & (PT_STATES - 1);
	u64 idx = (u64)(old & (PT_STATES - 1)) * PT_STATES + n;

	stat_add(a, PT_S_ENTERED + n);
	opaque(idx);
	if (a && idx < PT_STATES * PT_STATES)
		__sync_fetch_and_add(&a->transitions[0][0] + idx, 1);
}

static __always_inline void note_app_close(struct pt_agg *a,
					   struct pt_sock *rec, u32 tgid)
{
	if (rec->close_ns)
		return;
	rec->close_ns = bpf_ktime_get_ns();
	rec->closer_tgid = tgid;
	rec->app_closed = 1;
	stat_add(a, PT_S_APP_CLOSE);
}

static __always_inline void birth(struct pt_agg *a, struct sock *sk, u64 key,
				  int dir, int old, int new, u64 now)
{
	struct pt_sock rec = {};
	u32 tgid = bpf_get_current_pid_tgid() >> 32;

	rec.birth_ns = now;
	rec.state_ns = now;
	rec.state = new;
	rec.direction = dir;
	rec.owner_fd = -1;
	rec.transitions = 1;
	rec.history[0] = new;
	rec.netns_ino = sk_netns_ino(sk);
	read_addrs(&rec, sk);
	if (dir == PT_DIR_PASSIVE) {
		struct pt_listen_key lk = {
			.netns_ino = rec.netns_ino,
			.port = rec.lport,
			.family = rec.family,
		};
		u32 *ltgid = listeners.lookup(&lk);

		if (ltgid)
			rec.listener_tgid = *ltgid;
		/* Under --pid, keep only children of listeners we watch: the
		 * rest would fill the table with sockets nobody asked for. */
		if (PT_FILTER_OWNER &&
		    !(rec.listener_tgid && owner_wanted(rec.listener_tgid))) {
			stat_add(a, PT_S_FILTER_SKIPPED);
			return;
		}
	} else {
		/* connect() and listen() run in the owner's context. */
		if (!owner_wanted(tgid)) {
			stat_add(a, PT_S_FILTER_SKIPPED);
			return;
		}
		set_owner(&rec, tgid);
		rec.ino = sk_socket_ino(sk);
	}
	rec.counted = 1;
	if (dir == PT_DIR_LISTEN) {
		struct pt_listen_key lk = {
			.netns_ino = rec.netns_ino,
			.port = rec.lport,
			.family = rec.family,
		};

		if (listeners.update(&lk, &tgid))
			stat_add(a, PT_S_LISTENER_FAILED);
	}
	if (socks.update(&key, &rec)) {
		stat_add(a, PT_S_INSERT_FAILED);
		return;
	}
	if (rec.counted) {
		stat_add(a, PT_S_OPENED + dir);
		count_entry(a, &rec, old, new);
	}
}

/* First sight of a socket that was born before we attached. */
static __always_inline void midlife(struct pt_agg *a, struct sock *sk,
				    u64 key, int old, int new, u64 now)
{
	struct pt_sock rec = {};

	stat_add(a, PT_S_MIDLIFE);
	/* Under --pid nothing here names an owner: seeding at start covers
	 * the watched processes' pre-existing sockets. */
	if (PT_FILTER_OWNER) {
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
	rec.netns_ino = sk_netns_ino(sk);
	read_addrs(&rec, sk);
	if (socks.update(&key, &rec)) {
		stat_add(a, PT_S_INSERT_FAILED);
		return;
	}
	if (rec.counted)
		count_entry(a, &rec, old, new);
}

static __always_inline void handle_state(struct sock *sk, u64 key, int old,
					 int new)
{
	struct pt_agg *a = agg_get();
	struct pt_sock *rec;
	u64 now, hist_idx;
	int dir;

	if (!key)
		return;
	now = bpf_ktime_get_ns();
	rec = socks.lookup(&key);
	dir = birth_direction(old, new, rec != NULL);
	if (dir >= 0) {
		if (rec)	/* a reused socket: the old life ends here */
			finish(a, rec, now);
		if (old != TCP_SYN_RECV) {
			birth(a, sk, key, dir, old, new, now);
			return;
		}
		/* tcp_set_state() hook: the child's LISTEN -> SYN_RECV went
		 * through inet_sk_set_state() while the kernel handled the
		 * very ACK that completes the handshake now.  Record that
		 * birth, then this transition, as the tracepoint does. */
		birth(a, sk, key, dir, TCP_LISTEN, TCP_SYN_RECV, now);
		rec = socks.lookup(&key);
		if (!rec)	/* filtered out, or the table is full */
			return;
	}
	if (!rec) {
		midlife(a, sk, key, old, new, now);
		return;
	}
	if (rec->counted) {
		u32 o = rec->state & (PT_STATES - 1);

		observe(a, PT_HIST_STATE + o, now - rec->state_ns);
		stat_add(a, PT_S_LEFT + o);
		count_entry(a, rec, old, new);
	}
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

		listeners.delete(&lk);
	}
	/* connect() binds the local port after CLOSE -> SYN_SENT.  And on
	 * some kernels (seen on 6.1, not on 6.18) inet_csk_clone_lock()
	 * announces the child's SYN_RECV before it copies the peer's address
	 * and port into it, so a passive record read at birth has no peer:
	 * read again.  (bpf/pytracer.bpf.c only does the !lport part yet.) */
	if (!rec->lport || (!rec->rport && rec->direction != PT_DIR_LISTEN))
		read_addrs(rec, sk);
	if (old == TCP_ESTABLISHED && new == TCP_CLOSE_WAIT &&
	    !rec->app_closed)
		rec->flags |= PT_F_PEER_FIN;
	/* Only tcp_close()/tcp_shutdown() send our FIN, in process context. */
	if (new == TCP_FIN_WAIT1 || new == TCP_LAST_ACK)
		note_app_close(a, rec, bpf_get_current_pid_tgid() >> 32);
}

static __always_inline void handle_accept(struct sock *sk, u64 key, int fd,
					  u64 ino)
{
	struct pt_agg *a = agg_get();
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct pt_sock *rec;

	if (!key)
		return;
	rec = socks.lookup(&key);
	if (!rec) {
		if (owner_wanted(tgid))
			stat_add(a, PT_S_ACCEPT_UNTRACKED);
		return;
	}
	if (PT_FILTER_OWNER && !owner_wanted(tgid)) {
		/* Not ours to watch: free the slot now. */
		if (!rec->counted)
			socks.delete(&key);
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
			stat_add(a, PT_S_OPENED + (rec->direction & (PT_DIRS - 1)));
		stat_add(a, PT_S_ENTERED + (rec->state & (PT_STATES - 1)));
	}
}

static __always_inline void handle_close(struct sock *sk, u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = socks.lookup(&key);
	if (rec)
		note_app_close(agg_get(), rec, bpf_get_current_pid_tgid() >> 32);
}

static __always_inline void handle_reset(u64 key)
{
	struct pt_sock *rec = socks.lookup(&key);

	if (rec)
		rec->flags |= PT_F_RESET;
}

static __always_inline void handle_destroy(u64 key)
{
	struct pt_sock *rec;

	if (!key)
		return;
	rec = socks.lookup(&key);
	if (!rec)
		return;
	finish(agg_get(), rec, bpf_ktime_get_ns());
	socks.delete(&key);
}

/* --- state change -------------------------------------------------------- */

#ifdef PT_TP_STATE
int state_tracepoint(struct tracepoint__sock__inet_sock_set_state *args)
{
	struct sock *sk = (struct sock *)args->skaddr;

	if (args->protocol != IPPROTO_TCP)
		return 0;
	handle_state(sk, key_of(sk), args->oldstate, args->newstate);
	return 0;
}
#endif

int state_kprobe(struct pt_regs *ctx, struct sock *sk, int state)
{
	handle_state(sk, key_of(sk), sk_state_of(sk), state);
	return 0;
}

/* --- listen (for the tcp_set_state() kprobe) ------------------------------ */

/* listen() moves a socket to LISTEN with inet_sk_state_store(), which
 * tcp_set_state() never sees.  The kretprobe sees no arguments, so the
 * socket waits in "listening", by thread. */
BPF_HASH(listening, u64, u64, 4096);

int listen_kprobe(struct pt_regs *ctx, struct sock *sk)
{
	u64 tid = bpf_get_current_pid_tgid(), ptr = (u64)sk;

	if (listening.update(&tid, &ptr))
		stat_add(agg_get(), PT_S_INSERT_FAILED);
	return 0;
}

int listen_kretprobe(struct pt_regs *ctx)
{
	u64 tid = bpf_get_current_pid_tgid();
	u64 *ptr = listening.lookup(&tid);
	struct sock *sk;

	if (!ptr)
		return 0;
	sk = (struct sock *)*ptr;
	listening.delete(&tid);
	if (PT_REGS_RC(ctx) == 0 && is_tcp(sk))
		handle_state(sk, key_of(sk), TCP_CLOSE, TCP_LISTEN);
	return 0;
}

/* --- passive-open owner -------------------------------------------------- */

/* The return value is the same whatever inet_csk_accept()'s signature
 * (it changed in v6.10, commit 92ef0fd55ac8). */
int accept_kretprobe(struct pt_regs *ctx)
{
	struct sock *sk = (struct sock *)PT_REGS_RC(ctx);

	if (sk && is_tcp(sk))
		handle_accept(sk, key_of(sk), -1, 0);
	return 0;
}

/* fd -> file of the current task, if the fd is a socket. */
static __always_inline struct file *socket_file_of_fd(long fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct files_struct *files = NULL;
	struct fdtable *fdt = NULL;
	struct file **fds = NULL;
	struct file *file = NULL;
	struct inode *inode = NULL;
	unsigned int max_fds = 0;
	umode_t mode = 0;

	if (fd < 0)
		return NULL;
	READ(files, task->files);
	if (!files)
		return NULL;
	READ(fdt, files->fdt);
	if (!fdt)
		return NULL;
	READ(max_fds, fdt->max_fds);
	if (fd >= max_fds)
		return NULL;
	READ(fds, fdt->fd);
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	READ(inode, file->f_inode);
	if (!inode)
		return NULL;
	READ(mode, inode->i_mode);
	if ((mode & S_IFMT_) != S_IFSOCK_)
		return NULL;
	return file;
}

static __always_inline struct sock *sock_of_file(struct file *file)
{
	struct socket *sock = NULL;
	struct sock *sk = NULL;

	READ(sock, file->private_data);
	if (sock)
		READ(sk, sock->sk);
	return sk;
}

static __always_inline int accept_exit(long ret)
{
	struct file *file = socket_file_of_fd(ret);
	struct sock *sk;

	if (!file)
		return 0;
	sk = sock_of_file(file);
	if (sk && is_tcp(sk))
		handle_accept(sk, key_of(sk), ret, file_ino(file));
	return 0;
}

#ifdef PT_TP_ACCEPT4
int accept4_sys_exit(struct tracepoint__syscalls__sys_exit_accept4 *args)
{
	return accept_exit(args->ret);
}
#endif

#ifdef PT_TP_ACCEPT
int accept_sys_exit(struct tracepoint__syscalls__sys_exit_accept *args)
{
	return accept_exit(args->ret);
}
#endif

/* --- application close --------------------------------------------------- */

int close_kprobe(struct pt_regs *ctx, struct sock *sk)
{
	handle_close(sk, key_of(sk));
	return 0;
}

/*
 * Without a tcp_close() hook: close(fd) on a TCP socket.  Transitions to
 * FIN_WAIT1/LAST_ACK (only tcp_close/tcp_shutdown make them) and process
 * exit are caught in handle_state(); what is left is closing a socket that
 * is already CLOSE, e.g. after the peer's RST.
 */
#ifdef PT_TP_CLOSE
int close_sys_enter(struct tracepoint__syscalls__sys_enter_close *args)
{
	struct file *file = socket_file_of_fd((long)(int)args->fd);
	struct sock *sk;

	if (!file)
		return 0;
	sk = sock_of_file(file);
	if (sk && is_tcp(sk))
		handle_close(sk, key_of(sk));
	return 0;
}
#endif

/* --- reset received (optional) ------------------------------------------- */

#ifdef PT_TP_RESET
int reset_tracepoint(struct tracepoint__tcp__tcp_receive_reset *args)
{
	handle_reset(key_of((struct sock *)args->skaddr));
	return 0;
}
#endif

/* --- destroy ------------------------------------------------------------- */

#ifdef PT_TP_DESTROY
int destroy_tracepoint(struct tracepoint__tcp__tcp_destroy_sock *args)
{
	handle_destroy(key_of((struct sock *)args->skaddr));
	return 0;
}
#endif
