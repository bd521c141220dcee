// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * syscalls: the "tax on unrelated work" loops of the cost-of-watching benchmark.
 *
 *   syscalls N BATCHES DIR
 *
 * Three loops that touch no TCP socket, so a tracer of the TCP lifecycle
 * should leave them alone:
 *
 *   getppid    syscall(SYS_getppid): the cheapest round trip into the kernel
 *   openclose  open(O_RDONLY) + close of a regular file created in DIR
 *   pipe       write 1 byte into a pipe + read it back
 *
 * Each loop runs BATCHES batches of N operations, the loops taking turns
 * batch by batch so a burst of interference on this shared host hits them
 * alike.  Prints one JSON line: per loop, the ns per operation of every batch
 * by this thread's CPU clock (CLOCK_THREAD_CPUTIME_ID: the scheduler's
 * runtime, so time spent preempted by other tenants is not counted; the
 * syscall slow path runs in this thread and is) and by the wall clock.
 * Only enabling a syscall tracepoint (which sets SYSCALL_WORK_SYSCALL_TRACEPOINT
 * on every task: kernel/trace/trace_syscalls.c, syscall_regfunc()) should move
 * these; TCP tracepoints cannot.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCHES 64

struct tick {
	double cpu_ns, wall_ns;
};

static double clock_ns(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static struct tick now(void)
{
	return (struct tick){ clock_ns(CLOCK_THREAD_CPUTIME_ID), clock_ns(CLOCK_MONOTONIC) };
}

/* ns per operation since t0: {cpu, wall}. */
static struct tick per_op(struct tick t0, long n)
{
	struct tick t1 = now();

	return (struct tick){ (t1.cpu_ns - t0.cpu_ns) / n, (t1.wall_ns - t0.wall_ns) / n };
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static struct tick loop_getppid(long n)
{
	struct tick t0 = now();

	for (long i = 0; i < n; i++)
		syscall(SYS_getppid);
	return per_op(t0, n);
}

static struct tick loop_openclose(long n, const char *path)
{
	struct tick t0 = now();

	for (long i = 0; i < n; i++) {
		int fd = open(path, O_RDONLY);

		if (fd < 0)
			die("open");
		close(fd);
	}
	return per_op(t0, n);
}

static struct tick loop_pipe(long n, int p[2])
{
	char c = 'x';
	struct tick t0 = now();

	for (long i = 0; i < n; i++) {
		if (write(p[1], &c, 1) != 1 || read(p[0], &c, 1) != 1)
			die("pipe write/read");
	}
	return per_op(t0, n);
}

static void print_list(const char *name, const struct tick *v, int k, int last)
{
	printf("\"%s_cpu_ns\":[", name);
	for (int i = 0; i < k; i++)
		printf("%s%.2f", i ? "," : "", v[i].cpu_ns);
	printf("],\"%s_wall_ns\":[", name);
	for (int i = 0; i < k; i++)
		printf("%s%.2f", i ? "," : "", v[i].wall_ns);
	printf("]%s", last ? "" : ",");
}

int main(int argc, char **argv)
{
	struct tick g[MAX_BATCHES], o[MAX_BATCHES], p[MAX_BATCHES];
	char path[4096];
	long n;
	int k, fd, pp[2];

	if (argc != 4 || (n = atol(argv[1])) <= 0 || (k = atoi(argv[2])) <= 0 || k > MAX_BATCHES) {
		fprintf(stderr, "usage: syscalls N BATCHES(1-%d) DIR\n", MAX_BATCHES);
		return 2;
	}
	snprintf(path, sizeof(path), "%s/syscalls-XXXXXX", argv[3]);
	fd = mkstemp(path);
	if (fd < 0)
		die("mkstemp");
	close(fd);
	if (pipe(pp))
		die("pipe");
	/* One short warm-up of each: page cache, dentry, pipe buffer. */
	loop_getppid(n / 10 + 1);
	loop_openclose(n / 10 + 1, path);
	loop_pipe(n / 10 + 1, pp);
	for (int i = 0; i < k; i++) {
		g[i] = loop_getppid(n);
		o[i] = loop_openclose(n, path);
		p[i] = loop_pipe(n, pp);
	}
	unlink(path);
	printf("{\"n\":%ld,\"batches\":%d,", n, k);
	print_list("getppid", g, k, 0);
	print_list("openclose", o, k, 0);
	print_list("pipe", p, k, 1);
	printf("}\n");
	return 0;
}
