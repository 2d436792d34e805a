/*
 * loadgen: a small load client for the benchmarks, in C so that it is never
 * the bottleneck. Threads with blocking sockets, one connection per cycle.
 *
 *   loadgen MODE PORT TARGET PATH THREADS SECONDS
 *
 * MODE   direct  GET PATH straight from the origin at 127.0.0.1:PORT
 *        http    GET http://TARGET/PATH in absolute-form via the HTTP proxy at PORT
 *        connect CONNECT TARGET via the HTTP proxy at PORT, then GET PATH inside
 *        socks   SOCKS5 CONNECT to TARGET (domain form) via PORT, then GET PATH
 * Every cycle opens a new connection, sends one request with
 * "Connection: close", reads the response to EOF and closes. Prints one JSON
 * line: cycles per second, and p50/p99 of the cycle time and of the time to
 * the first response byte, in microseconds.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES 2000000

static const char *mode, *target, *path;
static int port, seconds;
static volatile int stop;
static uint32_t *cycle_us, *ttfb_us;
static long nsamples, nerrors;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n <= 0) return -1;
        buf += n;
        len -= n;
    }
    return 0;
}

/* Read until the end of an HTTP head; return 0 if its status is 200. */
static int read_head_200(int fd) {
    char buf[4096];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        ssize_t n = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (n <= 0) return -1;
        got += n;
        buf[got] = 0;
        if (strstr(buf, "\r\n\r\n")) return strncmp(buf + 9, "200", 3) == 0 ? 0 : -1;
    }
    return -1;
}

static int read_exact(int fd, unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n <= 0) return -1;
        buf += n;
        len -= n;
    }
    return 0;
}

static int socks_connect(int fd) {
    unsigned char buf[600];
    char host[256];
    const char *colon = strrchr(target, ':');
    size_t hlen = colon - target;
    memcpy(host, target, hlen);
    host[hlen] = 0;
    int tport = atoi(colon + 1);
    if (send_all(fd, "\x05\x01\x00", 3) || read_exact(fd, buf, 2) || buf[1] != 0) return -1;
    size_t n = 0;
    buf[n++] = 5; buf[n++] = 1; buf[n++] = 0; buf[n++] = 3; buf[n++] = (unsigned char)hlen;
    memcpy(buf + n, host, hlen); n += hlen;
    buf[n++] = tport >> 8; buf[n++] = tport & 0xff;
    if (send_all(fd, (char *)buf, n) || read_exact(fd, buf, 4) || buf[1] != 0) return -1;
    size_t rest = buf[3] == 1 ? 6 : buf[3] == 4 ? 18 : 0;
    if (buf[3] == 3) {
        if (read_exact(fd, buf, 1)) return -1;
        rest = buf[0] + 2;
    }
    return read_exact(fd, buf, rest);
}

static void *worker(void *arg) {
    (void)arg;
    char req[1024], buf[65536];
    int http = strcmp(mode, "http") == 0;
    int reqlen = snprintf(req, sizeof req,
                          "GET %s%s%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                          http ? "http://" : "", http ? target : "", path, target);
    while (!stop) {
        double t0 = now_us();
        int fd = dial();
        if (fd < 0) goto fail;
        if (strcmp(mode, "connect") == 0) {
            char c[512];
            int clen = snprintf(c, sizeof c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target);
            if (send_all(fd, c, clen) || read_head_200(fd)) goto fail_fd;
        } else if (strcmp(mode, "socks") == 0) {
            if (socks_connect(fd)) goto fail_fd;
        }
        if (send_all(fd, req, reqlen)) goto fail_fd;
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0) goto fail_fd;
        double t1 = now_us();
        if (strncmp(buf + 9, "200", 3) != 0) goto fail_fd;
        while ((n = recv(fd, buf, sizeof buf, 0)) > 0) {}
        close(fd);
        double t2 = now_us();
        pthread_mutex_lock(&lock);
        if (!stop && nsamples < MAX_SAMPLES) {
            cycle_us[nsamples] = (uint32_t)(t2 - t0);
            ttfb_us[nsamples] = (uint32_t)(t1 - t0);
            nsamples++;
        }
        pthread_mutex_unlock(&lock);
        continue;
    fail_fd:
        close(fd);
    fail:
        pthread_mutex_lock(&lock);
        nerrors++;
        pthread_mutex_unlock(&lock);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static uint32_t pct(uint32_t *v, long n, double p) {
    return n ? v[(long)((n - 1) * p)] : 0;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: loadgen direct|http|connect|socks PORT TARGET PATH THREADS SECONDS\n");
        return 2;
    }
    mode = argv[1];
    port = atoi(argv[2]);
    target = argv[3];
    path = argv[4];
    int threads = atoi(argv[5]);
    seconds = atoi(argv[6]);
    cycle_us = malloc(sizeof(uint32_t) * MAX_SAMPLES);
    ttfb_us = malloc(sizeof(uint32_t) * MAX_SAMPLES);
    pthread_t tids[512];
    if (threads > 512) threads = 512;
    double t0 = now_us();
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, NULL);
    sleep(seconds);
    pthread_mutex_lock(&lock);
    stop = 1;
    long n = nsamples;
    double elapsed = (now_us() - t0) / 1e6;
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    qsort(cycle_us, n, sizeof(uint32_t), cmp);
    qsort(ttfb_us, n, sizeof(uint32_t), cmp);
    printf("{\"mode\": \"%s\", \"per_second\": %.1f, \"cycles\": %ld, \"errors\": %ld, "
           "\"cycle_p50_us\": %u, \"cycle_p99_us\": %u, \"ttfb_p50_us\": %u, \"ttfb_p99_us\": %u}\n",
           mode, n / elapsed, n, nerrors, pct(cycle_us, n, 0.5), pct(cycle_us, n, 0.99),
           pct(ttfb_us, n, 0.5), pct(ttfb_us, n, 0.99));
    return 0;
}
