// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * churn: loopback TCP load for the pytracer benchmarks.  One file, four roles,
 * each printing one JSON line with its own counts (the ground truth):
 *
 *   churn loop   ADDR PORT N             connect/accept/close N times in one thread
 *   churn server ADDR PORT               epoll: accept, read 1 byte, write 1 byte, close
 *   churn client ADDR PORT N CONC RATE   epoll: N connections, CONC in flight,
 *                                        RATE new connections/s (0 = as fast as possible)
 *   churn http   ADDR PORT N CONC RATE   the same, paced, against an HTTP server: send
 *                                        "GET / HTTP/1.0", read to EOF (the server closes)
 *   churn hold   ADDR PORT N             open N connections to itself and hold them
 *
 * The server closes first, so TIME_WAIT lands on the server side and the
 * client never runs out of ephemeral ports.  With CHURN_WAIT=1 in the
 * environment, client and hold wait for a line on stdin before starting
 * (so a tracer can be attached, filtered on this pid, first).  server and
 * hold run until stdin reaches EOF or SIGTERM/SIGINT.  Every loop is bounded.
 * client and http also report their own CPU time (CLOCK_PROCESS_CPUTIME_ID:
 * the scheduler's runtime, exact), so a caller needs no /proc of an exited pid.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static double clock_s(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }

static void die(const char *what)
{
	fprintf(stderr, "churn: %s: %s\n", what, strerror(errno));
	exit(1);
}

static struct sockaddr_in addr_of(const char *host, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		fprintf(stderr, "churn: bad IPv4 address %s\n", host);
		exit(2);
	}
	return a;
}

static int listen_on(struct sockaddr_in *a, int nonblock)
{
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0);

	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)a, sizeof(*a)))
		die("bind");
	if (listen(fd, 4096))
		die("listen");
	return fd;
}

static void raise_nofile(void)
{
	struct rlimit r;

	if (getrlimit(RLIMIT_NOFILE, &r) == 0) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

static void wait_go(void)
{
	char buf[64];

	if (getenv("CHURN_WAIT") && read(0, buf, sizeof(buf)) < 0)
		die("read stdin");
}

/* Sequential: the external-clock loop for the per-connection cost. */
static int run_loop(struct sockaddr_in *a, long n)
{
	int lfd = listen_on(a, 0);
	long i, done = 0;
	double t0;

	wait_go();
	t0 = now_s();
	for (i = 0; i < n; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0)
			die("socket");
		if (connect(c, (struct sockaddr *)a, sizeof(*a)))
			die("connect");
		s = accept(lfd, NULL, NULL);
		if (s < 0)
			die("accept");
		close(s); /* server first: TIME_WAIT on the server side */
		close(c);
		done++;
	}
	printf("{\"role\":\"loop\",\"connections\":%ld,\"elapsed_s\":%.6f,\"pid\":%d}\n", done, now_s() - t0,
	       getpid());
	close(lfd);
	return 0;
}

static int run_server(struct sockaddr_in *a)
{
	int lfd = listen_on(a, 1), ep = epoll_create1(0);
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = lfd }, evs[256];
	long accepted = 0, served = 0, errors = 0;
	char buf[64];

	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev))
		die("epoll");
	ev.data.fd = 0;
	epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev); /* stdin EOF ends the server */
	printf("{\"role\":\"server\",\"ready\":true,\"pid\":%d}\n", getpid());
	fflush(stdout);
	while (!stop) {
		int n = epoll_wait(ep, evs, 256, 200), i;

		for (i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == 0) {
				if (read(0, buf, sizeof(buf)) <= 0)
					stop = 1;
				continue;
			}
			if (fd == lfd) {
				int k;

				for (k = 0; k < 1024; k++) {
					int s = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
					struct epoll_event e = { .events = EPOLLIN };

					if (s < 0)
						break;
					accepted++;
					e.data.fd = s;
					epoll_ctl(ep, EPOLL_CTL_ADD, s, &e);
				}
				continue;
			}
			if (read(fd, buf, sizeof(buf)) > 0 && write(fd, "y", 1) == 1)
				served++;
			else
				errors++;
			close(fd);
		}
	}
	printf("{\"role\":\"server\",\"accepted\":%ld,\"served\":%ld,\"errors\":%ld}\n", accepted, served, errors);
	return 0;
}

enum { CONNECTING = 1, WAITING = 2 };

static const char http_get[] = "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: churn\r\n\r\n";

/*
 * http = 0: write 1 byte, read the 1-byte reply, close.
 * http = 1: write an HTTP/1.0 GET, read until EOF (the server closes first),
 *           and count it completed when the reply starts with "HTTP/1.".
 */
static int run_client(struct sockaddr_in *a, long total, int conc, double rate, int http)
{
	int ep = epoll_create1(0);
	struct epoll_event evs[256];
	long started = 0, completed = 0, errors = 0, inflight = 0;
	double t0, deadline;
	char buf[4096];
	/* Per-fd "reply looked like HTTP" flag; fds stay below conc + a few. */
	int maxfd = conc + 1024;
	unsigned char *ok = calloc(maxfd, 1);

	if (ep < 0 || !ok)
		die("epoll");
	wait_go();
	t0 = now_s();
	/* Bounded: 10 minutes at most, whatever happens. */
	deadline = t0 + 600;
	while ((completed + errors < total) && !stop && now_s() < deadline) {
		int n, i;

		while (inflight < conc && started < total) {
			struct epoll_event e = { .events = EPOLLOUT | EPOLLIN };
			int c;

			if (rate > 0 && started >= (now_s() - t0) * rate)
				break;
			c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
			if (c < 0)
				die("socket");
			started++;
			if (c >= maxfd || (connect(c, (struct sockaddr *)a, sizeof(*a)) && errno != EINPROGRESS)) {
				errors++;
				close(c);
				continue;
			}
			ok[c] = 0;
			e.data.u64 = (unsigned long)c | ((unsigned long)CONNECTING << 32);
			epoll_ctl(ep, EPOLL_CTL_ADD, c, &e);
			inflight++;
		}
		n = epoll_wait(ep, evs, 256, rate > 0 ? 1 : 100);
		for (i = 0; i < n; i++) {
			int fd = (int)(evs[i].data.u64 & 0xffffffff);
			int st = (int)(evs[i].data.u64 >> 32);
			ssize_t r;

			if (st == CONNECTING) {
				struct epoll_event e = { .events = EPOLLIN };
				ssize_t len = http ? (ssize_t)sizeof(http_get) - 1 : 1;

				if ((evs[i].events & (EPOLLERR | EPOLLHUP)) ||
				    write(fd, http ? http_get : "x", len) != len) {
					errors++;
					inflight--;
					close(fd);
					continue;
				}
				e.data.u64 = (unsigned long)fd | ((unsigned long)WAITING << 32);
				epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e);
				continue;
			}
			r = read(fd, buf, sizeof(buf));
			if (http) {
				if (r > 0) {
					/* The status line arrives in the first read. */
					if (!ok[fd])
						ok[fd] = r >= 7 && !memcmp(buf, "HTTP/1.", 7) ? 1 : 2;
					continue; /* read again until EOF */
				}
				if (r < 0 && errno == EAGAIN)
					continue;
				if (r == 0 && ok[fd] == 1)
					completed++;
				else
					errors++;
			} else if (r >= 1) {
				/* The reply, then (usually in the same wakeup) the server's FIN. */
				completed++;
			} else {
				errors++;
			}
			inflight--;
			close(fd);
		}
	}
	printf("{\"role\":\"client\",\"started\":%ld,\"completed\":%ld,\"errors\":%ld,\"elapsed_s\":%.6f,"
	       "\"cpu_s\":%.9f,\"pid\":%d}\n", started, completed, errors, now_s() - t0,
	       clock_s(CLOCK_PROCESS_CPUTIME_ID), getpid());
	free(ok);
	return errors ? 3 : 0;
}

/* Hold N established connections (2N sockets) until stdin EOF or a signal. */
static int run_hold(struct sockaddr_in *a, long n)
{
	int lfd = listen_on(a, 0);
	long i, held = 0;
	double t0;
	char buf[64];

	wait_go();
	t0 = now_s();
	for (i = 0; i < n && !stop; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0), s;

		if (c < 0)
			die("socket");
		if (connect(c, (struct sockaddr *)a, sizeof(*a)))
			die("connect");
		s = accept(lfd, NULL, NULL);
		if (s < 0)
			die("accept");
		held++;
	}
	printf("{\"role\":\"hold\",\"connections\":%ld,\"elapsed_s\":%.6f,\"pid\":%d}\n", held, now_s() - t0,
	       getpid());
	fflush(stdout);
	while (!stop) {
		struct pollfd p = { .fd = 0, .events = POLLIN };

		if (poll(&p, 1, 200) > 0 && read(0, buf, sizeof(buf)) <= 0)
			break;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };
	struct sockaddr_in a;

	if (argc < 4) {
		fprintf(stderr, "usage: churn loop|server|client|http|hold ADDR PORT [N [CONC RATE]]\n");
		return 2;
	}
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	raise_nofile();
	a = addr_of(argv[2], atoi(argv[3]));
	if (!strcmp(argv[1], "loop") && argc == 5)
		return run_loop(&a, atol(argv[4]));
	if (!strcmp(argv[1], "server"))
		return run_server(&a);
	if (!strcmp(argv[1], "client") && argc == 7)
		return run_client(&a, atol(argv[4]), atoi(argv[5]), atof(argv[6]), 0);
	if (!strcmp(argv[1], "http") && argc == 7)
		return run_client(&a, atol(argv[4]), atoi(argv[5]), atof(argv[6]), 1);
	if (!strcmp(argv[1], "hold") && argc == 5)
		return run_hold(&a, atol(argv[4]));
	fprintf(stderr, "churn: bad arguments\n");
	return 2;
}
