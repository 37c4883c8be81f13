#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
enum { N = 64512, FIRST = 1024, LEN = 20 + 8 + 16 };
static unsigned short fold(unsigned long s) {
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (unsigned short)~s;
}
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW), size = 4 << 20;
    if (s < 0) { perror("socket"); return 1; }
    setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    struct sockaddr_in to = {.sin_family = AF_INET};
    struct in_addr src;
    if (inet_pton(AF_INET, argv[1], &src) != 1 || inet_pton(AF_INET, argv[2], &to.sin_addr) != 1)
        return 2;
    unsigned dport = (unsigned)atoi(argv[3]);
    unsigned char *buf = calloc(N, LEN);
    struct mmsghdr *m = calloc(N, sizeof *m);
    struct iovec *io = calloc(N, sizeof *io);
    if (!buf || !m || !io) return 1;
    for (int i = 0; i < N; i++) {
        unsigned char *p = buf + (size_t)i * LEN, *u = p + 20;
        unsigned sport = FIRST + i;
        p[0] = 0x45; p[2] = 0; p[3] = LEN; p[6] = 0x40; p[8] = 64; p[9] = 17;
        memcpy(p + 12, &src, 4); memcpy(p + 16, &to.sin_addr, 4);
        u[0] = sport >> 8; u[1] = sport & 0xff; u[2] = dport >> 8; u[3] = dport & 0xff;
        u[4] = 0; u[5] = 24;
        unsigned long sum = 17 + 24;
        for (int k = 12; k < 20; k += 2) sum += (p[k] << 8) | p[k + 1];
        for (int k = 0; k < 24; k += 2) sum += (u[k] << 8) | u[k + 1];
        unsigned short c = fold(sum);
        if (!c) c = 0xffff;
        u[6] = c >> 8; u[7] = c & 0xff;
        io[i].iov_base = p; io[i].iov_len = LEN;
        m[i].msg_hdr.msg_iov = &io[i]; m[i].msg_hdr.msg_iovlen = 1;
        m[i].msg_hdr.msg_name = &to; m[i].msg_hdr.msg_namelen = sizeof to;
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int done = 0; done < N;) {
        int r = sendmmsg(s, m + done, N - done > 1024 ? 1024 : N - done, 0);
        if (r <= 0) { perror("sendmmsg"); return 1; }
        done += r;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("seconds=%.6f\n", (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
