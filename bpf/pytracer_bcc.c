// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * pytracer kernel side for the bcc backend, for hosts without BTF: compiled
 * by bcc at start-up against the running kernel's headers and loaded by
 * pytracer/kernel/bcc.py.
 *
 * The lifecycle is bpf/lifecycle.bpf.h, the very code of the CO-RE program
 * (bpf/pytracer.bpf.c); this file has only the maps, the accessors that
 * header asks for (bcc's map syntax, bpf_probe_read_kernel() of the fields
 * the kernel headers lay out) and the programs.  Same ABI (bpf/pytracer.h),
 * same map names, types and layouts (socks, agg, owners, listeners), so the
 * poller, model, views and exporter read it unchanged.  What differs from
 * the CO-RE program:
 *
 *   - Records are always keyed by the sk pointer (PT_CFG_KEY_BY_PTR = 1, as
 *     pt_config.key_by_ptr in the CO-RE program's tracepoint and kprobe
 *     modes): kprobes and classic tracepoints cannot call
 *     bpf_get_socket_cookie().  A reused pointer starts a new life at its
 *     birth transition.  A pointer key is stable from the child's SYN_RECV
 *     on, so there are no embryos (embryo_take() finds none).
 *   - pt_config comes in as -D defines (PT_FILTER_OWNER, PT_MAX_SOCKETS),
 *     because bcc has no .rodata to set before load.
 *   - Programs exist only for hooks that need no BTF: tracepoint and kprobe.
 *     Tracepoint programs are compiled only when the tracepoint exists
 *     (PT_TP_* defines), since bcc builds their context struct from tracefs.
 *   - The optional reset hook is the classic tcp:tcp_receive_reset
 *     tracepoint (the CO-RE program uses its tp_btf twin).
 *   - Kernel memory is read with explicit bpf_probe_read_kernel() instead of
 *     CO-RE relocations; offsets come from the headers bcc compiles against.
 *   - agg has only its entry 0, updated with atomic adds, and enter()/leave()
 *     do nothing; the CO-RE program's second entry for nested runs (and its
 *     plain adds) is a cost optimisation, and readers sum whatever entries
 *     exist.
 *   - close(2) without a tcp_close() kprobe checks that the socket is TCP
 *     before it looks the pointer up.
 *
 *   state change   tracepoint sock/inet_sock_set_state > kprobe tcp_set_state
 *   accept owner   kretprobe inet_csk_accept > sys_exit_accept{,4}
 *   connect owner  the CLOSE -> SYN_SENT transition runs in connect()
 *   app close      kprobe tcp_close > sys_enter_close
 *   end            the transition to CLOSE (no destroy hook)
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
#include <net/inet_connection_sock.h>
#include <linux/tcp.h>
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

/* Sized from --max-sockets by the loader (PT_MAX_SOCKETS).  Preallocated
 * (PT_SOCKS_FLAGS 0) where the kernel cannot allocate safely in kprobe and
 * tracepoint programs: see table_prealloc_reason() in pytracer/kernel/hooks.py. */
#ifndef PT_SOCKS_FLAGS
#define PT_SOCKS_FLAGS		BPF_F_NO_PREALLOC
#endif
BPF_F_TABLE("hash", u64, struct pt_sock, socks, PT_MAX_SOCKETS, PT_SOCKS_FLAGS);

BPF_PERCPU_ARRAY(agg, struct pt_agg, 1);

#ifndef PT_MAX_OWNERS
#define PT_MAX_OWNERS		1024
#endif

/* Owner filter (--pid): tgids whose sockets are counted.  Sized by the
 * loader (PT_MAX_OWNERS) when it follows a process tree (tracer run). */
BPF_HASH(owners, u32, u8, PT_MAX_OWNERS);

/* Listening sockets' owners, so accepted children can be attributed (and
 * filtered) from birth, and never-accepted ones still name a process. */
BPF_HASH(listeners, struct pt_listen_key, u32, 16384);

/* Service ports named by user space (--service-ports): port -> slot. */
BPF_HASH(svc_ports, struct pt_svc_key, u32, PT_SVC_SLOTS);

/* Per service slot (0: other): lifetime and idle-before-end histograms. */
BPF_PERCPU_ARRAY(svc, struct pt_svc, PT_SVC_SLOTS);

/* --- what bpf/lifecycle.bpf.h needs: configuration --------------------- */

#define PT_CFG_FILTER_OWNER	PT_FILTER_OWNER
#define PT_CFG_KEY_BY_PTR	1
#define PT_CFG_HZ		HZ

/* --- aggregation --------------------------------------------------------- */

static __always_inline struct pt_agg *agg_get(void)
{
	int zero = 0;

	return agg.lookup(&zero);
}

static __always_inline struct pt_agg *agg_top(void)
{
	return agg_get();
}

/*
 * One entry, which nested runs share: atomic adds.  The value goes through
 * a register the compiler cannot see into: LLVM turns an atomic add of a
 * constant 0 (a child's zero dwell in SYN_RECV under the tcp_set_state()
 * kprobe) into an atomic OR, which the BPF backend cannot emit before
 * LLVM 12 ("Cannot select: AtomicLoadOr"; bcc 0.18 on Debian 11 uses LLVM 11).
 */
#define agg_add(p, v)							\
	({								\
		__u64 __v = (v);					\
		asm volatile("" : "+r"(__v));				\
		__sync_fetch_and_add(p, __v);				\
	})

static __always_inline u32 enter(void)
{
	return 0;
}

static __always_inline void leave(u32 was)
{
}

/* --- maps (bcc rewrites this syntax in this file only) ------------------- */

static __always_inline struct pt_sock *sock_lookup(u64 key)
{
	return socks.lookup(&key);
}

static __always_inline int sock_update(u64 key, struct pt_sock *rec)
{
	return socks.update(&key, rec);
}

static __always_inline void sock_delete(u64 key)
{
	socks.delete(&key);
}

/* Readers of this backend walk the whole table every time. */
static __always_inline void sock_written(u64 key)
{
}

static __always_inline u32 *listener_lookup(struct pt_listen_key *lk)
{
	return listeners.lookup(lk);
}

static __always_inline int listener_update(struct pt_listen_key *lk, u32 *tgid)
{
	return listeners.update(lk, tgid);
}

static __always_inline void listener_delete(struct pt_listen_key *lk)
{
	listeners.delete(lk);
}

static __always_inline bool owner_listed(u32 tgid)
{
	return owners.lookup(&tgid) != NULL;
}

/* Keyed by pointer: no embryos (see the header comment). */
static __always_inline bool embryo_take(struct sock *sk, u64 *born_ns)
{
	return false;
}

/* --- socket facts -------------------------------------------------------- */

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

/* `btf` is always false here: no program of this file has BTF pointers. */
static __always_inline u32 netns_of(struct sock *sk, bool btf)
{
	struct net *net = NULL;
	u32 inum = 0;

	READ(net, sk->__sk_common.skc_net.net);
	if (net)
		READ(inum, net->ns.inum);
	return inum;
}

static __always_inline void read_addrs(struct pt_sock *rec, struct sock *sk,
				       bool btf)
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

static __always_inline u64 sk_ino(struct sock *sk, bool btf)
{
	struct socket *sock = NULL;
	struct file *file = NULL;

	READ(sock, sk->sk_socket);
	if (!sock)
		return 0;
	READ(file, sock->file);
	return file_ino(file);
}

/* --- idle before end ----------------------------------------------------- */

static __always_inline u32 *svc_slot(struct pt_svc_key *k)
{
	return svc_ports.lookup(k);
}

static __always_inline struct pt_svc *svc_get(u32 slot)
{
	return svc.lookup(&slot);
}

/* The process tree, for `tracer run` (compiled only with PT_FOLLOW). */
#ifdef PT_FOLLOW
BPF_ARRAY(tree, struct pt_tree, 1);

#define PT_HAVE_FOLLOW 1

static __always_inline int owner_add(u32 tgid)
{
	u8 one = 1;

	return owners.update(&tgid, &one);
}

static __always_inline int owner_remove(u32 tgid)
{
	return owners.delete(&tgid);
}

static __always_inline struct pt_tree *tree_counts(void)
{
	int zero = 0;

	return tree.lookup(&zero);
}
#endif

struct pt_end_facts;
static __always_inline void read_end_facts(struct sock *sk,
					   struct pt_end_facts *f, bool btf);

/* The CO-RE program reads the socket's own stamp on some transitions; here
 * every one reads the clock (a probe read would cost about as much). */
#define transition_ns(sk, old, new, since, btf)	bpf_ktime_get_ns()

#include "lifecycle.bpf.h"

/* Once per connection, at its end.  `btf` is always false here. */
static __always_inline void read_end_facts(struct sock *sk,
					   struct pt_end_facts *f, bool btf)
{
	struct inet_connection_sock *icsk = (struct inet_connection_sock *)sk;
	struct tcp_sock *tp = (struct tcp_sock *)sk;

	READ(f->lrcvtime, icsk->icsk_ack.lrcvtime);
	READ(f->lsndtime, tp->lsndtime);
	READ(f->rcv_tstamp, tp->rcv_tstamp);
	READ(f->err, sk->sk_err);
	READ(f->probes_out, icsk->icsk_probes_out);
	READ(f->retransmits, icsk->icsk_retransmits);
}

/* --- state change -------------------------------------------------------- */

#ifdef PT_TP_STATE
int state_tracepoint(struct tracepoint__sock__inet_sock_set_state *args)
{
	struct sock *sk = (struct sock *)args->skaddr;

	if (args->protocol == IPPROTO_TCP)
		handle_state(sk, key_of(sk), args->oldstate, args->newstate,
			     false);
	return 0;
}
#endif

int state_kprobe(struct pt_regs *ctx, struct sock *sk, int state)
{
	handle_state(sk, key_of(sk), sk_state_of(sk), state, false);
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
		stat_add_top(agg_top(), PT_S_INSERT_FAILED);
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
		handle_state(sk, key_of(sk), TCP_CLOSE, TCP_LISTEN, false);
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
	handle_close(key_of(sk));
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
		handle_close(key_of(sk));
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

/* --- process tree (tracer run; only with PT_FOLLOW) ---------------------- */

/*
 * The twins of the CO-RE program's fork_tracepoint and exit_tracepoint
 * (follow_fork() and follow_exit() are in bpf/lifecycle.bpf.h).  The fork
 * event names the child by pid, a thread id for a new thread, so a thread's
 * entry is taken out when the thread exits.  Compiled only for `tracer run`.
 */
#ifdef PT_FOLLOW
int fork_tracepoint(struct tracepoint__sched__sched_process_fork *args)
{
	follow_fork(bpf_get_current_pid_tgid() >> 32, args->child_pid);
	return 0;
}

int exit_tracepoint(struct tracepoint__sched__sched_process_exit *args)
{
	u64 id = bpf_get_current_pid_tgid();
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct signal_struct *sig = NULL;
	int live = 1;

	if ((u32)id != (u32)(id >> 32))
		follow_exit((u32)id);
	READ(sig, task->signal);
	if (sig)
		READ(live, sig->live.counter);
	if (live == 0)
		follow_exit(id >> 32);
	return 0;
}
#endif
