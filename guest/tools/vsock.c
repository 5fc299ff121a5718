/* vsock: a tiny AF_VSOCK tool for the default guest (busybox has none).
 *
 *   vsock listen PORT           echo every connection back (one child each)
 *   vsock hold PORT             accept connections and never read them
 *   vsock connect CID PORT      stdin to the socket, the socket to stdout
 *   vsock check CID PORT BYTES  send BYTES of a pattern, read the echo back,
 *                               compare; prints "vsock-check OK <bytes>"
 *   vsock wait CID PORT         connect and wait until the peer closes
 *
 * Static, no allocation beyond the stack; exit status 0 on success. */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what) { perror(what); return 1; }

static int open_listener(unsigned port) {
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0 || bind(s, (void *)&a, sizeof a) < 0 || listen(s, 16) < 0)
		return -1;
	return s;
}

static int dial(unsigned cid, unsigned port) {
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	/* The kernel's default is 2 s for the peer's answer: too short for an
	 * emulated guest kernel busy with other connections. */
	struct timeval patience = { .tv_sec = 120 };
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s >= 0)
		setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &patience, sizeof patience);
	if (s < 0 || connect(s, (void *)&a, sizeof a) < 0)
		return -1;
	return s;
}

static int write_all(int fd, const char *p, size_t n) {
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR) continue;
		if (w <= 0) return -1;
		p += w; n -= w;
	}
	return 0;
}

static void echo(int c) {
	static char buf[65536];
	for (;;) {
		ssize_t r = read(c, buf, sizeof buf);
		if (r < 0 && errno == EINTR) continue;
		if (r <= 0 || write_all(c, buf, r) < 0) break;
	}
	shutdown(c, SHUT_WR);
	close(c);
}

static unsigned char pattern(unsigned long i) {
	unsigned long x = i / 8 * 0x9E3779B97F4A7C15UL + 12345;
	x ^= x >> 29; x *= 0xBF58476D1CE4E5B9UL; x ^= x >> 32;
	return (unsigned char)(x >> (8 * (i % 8)));
}

static int check(int s, unsigned long total) {
	static char out[65536], in[65536];
	unsigned long sent = 0, got = 0;
	struct pollfd p = { .fd = s };
	while (got < total) {
		p.events = POLLIN | (sent < total ? POLLOUT : 0);
		if (poll(&p, 1, -1) < 0) { if (errno == EINTR) continue; return die("poll"); }
		if (p.revents & POLLOUT && sent < total) {
			size_t n = total - sent < sizeof out ? total - sent : sizeof out;
			for (size_t k = 0; k < n; k++) out[k] = pattern(sent + k);
			ssize_t w = send(s, out, n, MSG_DONTWAIT);
			if (w > 0) sent += w;
			else if (w < 0 && errno != EAGAIN && errno != EINTR) return die("send");
			if (sent == total) shutdown(s, SHUT_WR);
		}
		if (p.revents & (POLLIN | POLLHUP)) {
			ssize_t r = recv(s, in, sizeof in, MSG_DONTWAIT);
			if (r == 0) break;
			if (r < 0) { if (errno == EAGAIN || errno == EINTR) continue; return die("recv"); }
			for (ssize_t k = 0; k < r; k++)
				if ((unsigned char)in[k] != pattern(got + k)) {
					printf("vsock-check FAIL mismatch at %lu\n", got + k);
					return 1;
				}
			got += r;
		}
	}
	if (got != total) { printf("vsock-check FAIL got %lu of %lu\n", got, total); return 1; }
	printf("vsock-check OK %lu\n", got);
	return 0;
}

static int pump(int s) {
	static char buf[65536];
	struct pollfd p[2] = { { .fd = 0, .events = POLLIN }, { .fd = s, .events = POLLIN } };
	for (;;) {
		if (poll(p, 2, -1) < 0) { if (errno == EINTR) continue; return die("poll"); }
		if (p[0].revents) {
			ssize_t r = read(0, buf, sizeof buf);
			if (r <= 0) { shutdown(s, SHUT_WR); p[0].fd = -1; }
			else if (write_all(s, buf, r) < 0) return die("write");
		}
		if (p[1].revents) {
			ssize_t r = read(s, buf, sizeof buf);
			if (r <= 0) return 0;
			if (write_all(1, buf, r) < 0) return die("stdout");
		}
	}
}

int main(int argc, char **argv) {
	if (argc == 3 && (!strcmp(argv[1], "listen") || !strcmp(argv[1], "hold"))) {
		int hold = !strcmp(argv[1], "hold");
		int l = open_listener(strtoul(argv[2], 0, 10));
		if (l < 0) return die("listen");
		signal(SIGCHLD, SIG_IGN);
		for (;;) {
			int c = accept(l, 0, 0);
			if (c < 0) { if (errno == EINTR) continue; return die("accept"); }
			if (hold) continue;             /* accepted, never read: the credit holds the sender */
			if (fork() == 0) { close(l); echo(c); _exit(0); }
			close(c);
		}
	}
	if (argc >= 4) {
		int s = dial(strtoul(argv[2], 0, 10), strtoul(argv[3], 0, 10));
		if (s < 0) return die("connect");
		if (!strcmp(argv[1], "connect")) return pump(s);
		if (!strcmp(argv[1], "check") && argc == 5) return check(s, strtoul(argv[4], 0, 10));
		if (!strcmp(argv[1], "wait")) { char b; while (read(s, &b, 1) > 0) ; return 0; }
	}
	fprintf(stderr, "usage: vsock listen|hold PORT | connect CID PORT | check CID PORT BYTES | wait CID PORT\n");
	return 2;
}
