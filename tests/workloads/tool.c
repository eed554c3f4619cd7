// The test workload: one WASI program whose first argument picks what it does, so every
// end-to-end test runs real wasm built from this source (by tests/build.rs).
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>

extern char **environ;

static int usage(void) {
    fprintf(stderr, "usage: tool hello|echo ARGS|env|cat PATH|write PATH TEXT|exit N|trap|loop|"
                    "sleep SECS|long N|stderr TEXT|grow MIB|hold MIB|fill PATH MIB|spew N|stdin|count|isatty\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        printf("hello from wasm\n");
        return 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "hello")) {
        printf("hello from wasm\n");
    } else if (!strcmp(cmd, "echo")) {
        for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    } else if (!strcmp(cmd, "env")) {
        for (char **e = environ; *e; e++) printf("%s\n", *e);
    } else if (!strcmp(cmd, "cat") && argc >= 3) {
        FILE *f = fopen(argv[2], "r");
        if (!f) {
            fprintf(stderr, "open %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
    } else if (!strcmp(cmd, "write") && argc >= 4) {
        FILE *f = fopen(argv[2], "w");
        if (!f) {
            fprintf(stderr, "open %s for writing: %s\n", argv[2], strerror(errno));
            return 1;
        }
        fputs(argv[3], f);
        if (fclose(f) != 0) {
            fprintf(stderr, "write %s: %s\n", argv[2], strerror(errno));
            return 1;
        }
        printf("wrote %s\n", argv[2]);
    } else if (!strcmp(cmd, "exit") && argc >= 3) {
        printf("exiting with %s\n", argv[2]);
        fflush(stdout);
        exit(atoi(argv[2]));
    } else if (!strcmp(cmd, "trap")) {
        printf("about to trap\n");
        fflush(stdout);
        __builtin_trap();
    } else if (!strcmp(cmd, "loop")) {
        printf("looping\n");
        fflush(stdout);
        volatile unsigned long n = 0;
        for (;;) n++;
    } else if (!strcmp(cmd, "sleep") && argc >= 3) {
        printf("sleeping %s s\n", argv[2]);
        fflush(stdout);
        struct timespec ts = {atoi(argv[2]), 0};
        nanosleep(&ts, NULL);
        printf("slept\n");
    } else if (!strcmp(cmd, "long") && argc >= 3) {
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) putchar('x');
        printf("\nend\n");
    } else if (!strcmp(cmd, "stderr") && argc >= 3) {
        fprintf(stderr, "%s\n", argv[2]);
        printf("to stdout\n");
    } else if ((!strcmp(cmd, "grow") || !strcmp(cmd, "hold")) && argc >= 3) {
        // Keep every block reachable and read it back so the allocations cannot be elided;
        // `hold` keeps them until killed.
        static char *blocks[4096];
        int mib = atoi(argv[2]);
        long sum = 0;
        for (int i = 0; i < mib && i < 4096; i++) {
            blocks[i] = malloc(1 << 20);
            if (!blocks[i]) {
                fprintf(stderr, "malloc failed after %d MiB\n", i);
                return 3;
            }
            memset(blocks[i], 1, 1 << 20);
            sum += blocks[i][i];
        }
        if (!strcmp(cmd, "grow")) {
            printf("grew %d MiB\n", (int)sum);
            return 0;
        }
        printf("holding %ld MiB\n", sum);
        fflush(stdout);
        for (;;) {
            struct timespec ts = {3600, 0};
            nanosleep(&ts, NULL);
        }
    } else if (!strcmp(cmd, "fill") && argc >= 4) {
        // Writes MIB to PATH, then waits until killed.
        FILE *f = fopen(argv[2], "w");
        if (!f) {
            fprintf(stderr, "open %s for writing: %s\n", argv[2], strerror(errno));
            return 1;
        }
        static char block[1 << 20];
        memset(block, 'x', sizeof block);
        int mib = atoi(argv[3]);
        for (int i = 0; i < mib; i++) fwrite(block, 1, sizeof block, f);
        fclose(f);
        printf("filled %s with %d MiB\n", argv[2], mib);
        fflush(stdout);
        for (;;) {
            struct timespec ts = {3600, 0};
            nanosleep(&ts, NULL);
        }
    } else if (!strcmp(cmd, "spew") && argc >= 3) {
        // Writes N numbered 100-byte lines to stdout as fast as it can.
        long n = atol(argv[2]);
        char line[101];
        memset(line, 'y', sizeof line);
        for (long i = 0; i < n; i++) {
            int k = snprintf(line, sizeof line, "line %09ld ", i);
            line[k] = 'y';
            line[99] = '\n';
            fwrite(line, 1, 100, stdout);
        }
        printf("spewed %ld lines\n", n);
    } else if (!strcmp(cmd, "stdin")) {
        // Copies stdin to stdout; how much it read goes to stderr.
        static char buf[65536];
        size_t n;
        long long total = 0;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
            fwrite(buf, 1, n, stdout);
            total += n;
        }
        fflush(stdout);
        fprintf(stderr, "read %lld bytes\n", total);
    } else if (!strcmp(cmd, "count")) {
        static char buf[65536];
        size_t n;
        long long total = 0;
        while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) total += n;
        printf("read %lld bytes\n", total);
    } else if (!strcmp(cmd, "isatty")) {
        printf("stdin=%d stdout=%d stderr=%d\n", isatty(0), isatty(1), isatty(2));
    } else if (!strcmp(cmd, "partial")) {
        printf("no newline at the end");
    } else {
        return usage();
    }
    return 0;
}
