// The socket test workload: a wasi:cli/command that uses wasi:sockets through the C bindings
// tests/build.rs generates. Its first argument picks what it does (or its argv[0], when it is
// one of connect, connect-n, bench-connect, lookup, ready and udp-ask: an exec's command):
//   serve PORT        TCP server on 0.0.0.0:PORT; answers each connection's first read with
//                     "<HOSTNAME> got <bytes>" (or, to an HTTP GET, a minimal HTTP/1.0
//                     response; to "ready?", yes or no) and closes it
//   hold PORT         TCP server on 0.0.0.0:PORT that accepts connections ("holding a
//                     connection") and never reads them
//   connect HOST PORT MSG
//                     looks HOST up, connects, sends MSG, prints the answer
//   connect-n HOST PORT N MSG
//                     the same N times over, one connection and one answer line each
//   bench-connect HOST PORT N MSG
//                     connect-n without the output: prints one line with the requests per
//                     second and the latencies' p50 and p99 in microseconds
//   blast HOST PORT MB
//                     sends MB MiB to a sink at HOST:PORT and prints the rate
//   lookup NAME       prints NAME's addresses, one per line
//   ready PORT        asks the server on localhost:PORT "ready?": exits 0 if it says yes (a
//                     readiness probe); a server that got "set-unready" says no from then on
//   udp-echo PORT     UDP server on 0.0.0.0:PORT; answers each datagram with
//                     "<HOSTNAME> echoes <bytes>"
//   udp-ask HOST PORT MSG connected|unconnected
//                     sends MSG in a datagram to HOST:PORT, on a socket streamed to that
//                     address or not, and prints the answer and where it came from
//                     ("<answer> from A.B.C.D:P"; connected, also "remote A.B.C.D:P" first),
//                     or "no answer" after 3 s
//   (run as httpd) HTTP on port 80, its command line logged first
//   grpc-health PORT N
//                     gRPC health server over h2c on 0.0.0.0:PORT: answers every call
//                     (grpc.health.v1.Health/Check) NOT_SERVING N times, then SERVING
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "net.h"

static wasi_sockets_network_borrow_network_t network(void) {
    static int have;
    static wasi_sockets_network_own_network_t own;
    if (!have) {
        own = wasi_sockets_instance_network_instance_network();
        have = 1;
    }
    return wasi_sockets_network_borrow_network(own);
}

static void block_on(wasi_io_poll_own_pollable_t p) {
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(p));
    wasi_io_poll_pollable_drop_own(p);
}

static int fail(const char *what, int code) {
    fprintf(stderr, "%s: error code %d\n", what, code);
    return 1;
}

static void print_ip(wasi_sockets_network_ip_address_t *a) {
    if (a->tag == WASI_SOCKETS_NETWORK_IP_ADDRESS_IPV4) {
        wasi_sockets_network_ipv4_address_t v = a->val.ipv4;
        printf("%u.%u.%u.%u\n", v.f0, v.f1, v.f2, v.f3);
    } else {
        wasi_sockets_network_ipv6_address_t v = a->val.ipv6;
        printf("%x:%x:%x:%x:%x:%x:%x:%x\n", v.f0, v.f1, v.f2, v.f3, v.f4, v.f5, v.f6, v.f7);
    }
}

// Resolves NAME; fills up to MAX addresses, returns how many (or -1).
static int lookup(const char *name, wasi_sockets_network_ip_address_t *out, int max) {
    net_string_t s;
    net_string_set(&s, name);
    wasi_sockets_ip_name_lookup_own_resolve_address_stream_t stream;
    wasi_sockets_ip_name_lookup_error_code_t err;
    if (!wasi_sockets_ip_name_lookup_resolve_addresses(network(), &s, &stream, &err)) {
        fprintf(stderr, "resolve %s: error code %d\n", name, err);
        return -1;
    }
    wasi_sockets_ip_name_lookup_borrow_resolve_address_stream_t b =
        wasi_sockets_ip_name_lookup_borrow_resolve_address_stream(stream);
    int n = 0;
    for (;;) {
        wasi_sockets_ip_name_lookup_option_ip_address_t next;
        if (!wasi_sockets_ip_name_lookup_method_resolve_address_stream_resolve_next_address(b, &next, &err)) {
            if (err == WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
                block_on(wasi_sockets_ip_name_lookup_method_resolve_address_stream_subscribe(b));
                continue;
            }
            fprintf(stderr, "resolve %s: error code %d\n", name, err);
            n = -1;
            break;
        }
        if (!next.is_some) break;
        if (n < max) out[n++] = next.val;
    }
    wasi_sockets_ip_name_lookup_resolve_address_stream_drop_own(stream);
    return n;
}

static void write_all(wasi_io_streams_own_output_stream_t out, const char *data, size_t len) {
    net_list_u8_t list = {(uint8_t *)data, len};
    wasi_io_streams_stream_error_t err;
    wasi_io_streams_method_output_stream_blocking_write_and_flush(wasi_io_streams_borrow_output_stream(out), &list,
                                                                  &err);
}

// The first chunk the peer sends (up to 1024 bytes), NUL-terminated in BUF.
static size_t read_some(wasi_io_streams_own_input_stream_t in, char *buf, size_t cap) {
    net_list_u8_t got;
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(in), cap - 1, &got,
                                                           &err)) {
        buf[0] = 0;
        return 0;
    }
    size_t n = got.len < cap - 1 ? got.len : cap - 1;
    memcpy(buf, got.ptr, n);
    buf[n] = 0;
    net_list_u8_free(&got);
    return n;
}

// IPv4 ADDRESS:PORT as a socket address (all zeros: any address).
static wasi_sockets_network_ip_socket_address_t ipv4(wasi_sockets_network_ipv4_address_t address, int port) {
    wasi_sockets_network_ip_socket_address_t a = {0};
    a.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4;
    a.val.ipv4.port = (uint16_t)port;
    a.val.ipv4.address = address;
    return a;
}

static const wasi_sockets_network_ipv4_address_t ANY = {0};

// A TCP socket listening on 0.0.0.0:PORT, in *SOCK; 0, or 1 after printing why not.
static int listen_on(int port, wasi_sockets_tcp_own_tcp_socket_t *sock) {
    wasi_sockets_tcp_error_code_t err;
    if (!wasi_sockets_tcp_create_socket_create_tcp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, sock, &err))
        return fail("create socket", err);
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(*sock);
    wasi_sockets_tcp_ip_socket_address_t addr = ipv4(ANY, port);
    if (!wasi_sockets_tcp_method_tcp_socket_start_bind(s, network(), &addr, &err)) return fail("bind", err);
    while (!wasi_sockets_tcp_method_tcp_socket_finish_bind(s, &err)) {
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) return fail("bind", err);
        block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
    }
    if (!wasi_sockets_tcp_method_tcp_socket_start_listen(s, &err)) return fail("listen", err);
    while (!wasi_sockets_tcp_method_tcp_socket_finish_listen(s, &err)) {
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) return fail("listen", err);
        block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
    }
    printf("listening on %d\n", port);
    fflush(stdout);
    return 0;
}

// Set by `serve PORT stubborn`: a closed listener is ignored (the server runs on).
static int stubborn;

// The next connection on the listening socket S. When the listener is closed (the
// runtime does that at a stop), the server ends with 0, as a server does at SIGTERM, or a
// stubborn one ignores it and sleeps on.
static wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t accept_on(
    wasi_sockets_tcp_borrow_tcp_socket_t s) {
    wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn;
    wasi_sockets_tcp_error_code_t err;
    while (!wasi_sockets_tcp_method_tcp_socket_accept(s, &conn, &err)) {
        if (err == WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
            block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
            continue;
        }
        printf("listener closed (accept: error code %d)\n", err);
        fflush(stdout);
        if (!stubborn) exit(0);
        for (;;) sleep(3600);
    }
    return conn;
}

static void close_conn(wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn) {
    wasi_io_streams_input_stream_drop_own(conn.f1);
    wasi_io_streams_output_stream_drop_own(conn.f2);
    wasi_sockets_tcp_tcp_socket_drop_own(conn.f0);
}

// Set by a "set-unready" message: the server says no to "ready?" from then on.
static int unready;

static int serve(int port) {
    wasi_sockets_tcp_own_tcp_socket_t sock;
    if (listen_on(port, &sock)) return 1;
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    const char *me = getenv("HOSTNAME");
    for (;;) {
        wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn = accept_on(s);
        char buf[1024], reply[1400];
        read_some(conn.f1, buf, sizeof buf);
        int n;
        if (!strncmp(buf, "GET ", 4)) {
            // An HTTP client (a load generator): a minimal HTTP/1.0 answer, then close.
            char body[256];
            int len = snprintf(body, sizeof body, "%s got a request\n", me ? me : "?");
            n = snprintf(reply, sizeof reply,
                         "HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len, body);
        } else if (!strcmp(buf, "ready?")) {
            n = snprintf(reply, sizeof reply, "%s", unready ? "no" : "yes");
        } else {
            if (!strcmp(buf, "set-unready")) unready = 1;
            n = snprintf(reply, sizeof reply, "%s got %s", me ? me : "?", buf);
        }
        write_all(conn.f2, reply, (size_t)n);
        close_conn(conn);
    }
}

// Accepts connections and never reads them: what the peers send waits in the guest's sockets
// (the memory accounting of their queues is tested with it).
static int hold(int port) {
    wasi_sockets_tcp_own_tcp_socket_t sock;
    if (listen_on(port, &sock)) return 1;
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    for (;;) {
        accept_on(s);
        printf("holding a connection\n");
        fflush(stdout);
    }
}

// Counts what each connection sends until the client ends its side, answers the count and
// closes (a bulk-transfer sink, for throughput measurements).
static int sink(int port) {
    wasi_sockets_tcp_own_tcp_socket_t sock;
    if (listen_on(port, &sock)) return 1;
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    for (;;) {
        wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn = accept_on(s);
        unsigned long long total = 0;
        for (;;) {
            net_list_u8_t chunk;
            wasi_io_streams_stream_error_t err;
            if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(conn.f1), 65536,
                                                                   &chunk, &err))
                break;
            total += chunk.len;
            net_list_u8_free(&chunk);
        }
        char reply[32];
        int n = snprintf(reply, sizeof reply, "%llu\n", total);
        write_all(conn.f2, reply, (size_t)n);
        close_conn(conn);
    }
}

// Exactly N bytes from IN into BUF: 1, or 0 at the end of the stream.
static int read_exact(wasi_io_streams_own_input_stream_t in, uint8_t *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        net_list_u8_t chunk;
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_input_stream_blocking_read(wasi_io_streams_borrow_input_stream(in), n - got,
                                                               &chunk, &err))
            return 0;
        memcpy(buf + got, chunk.ptr, chunk.len);
        got += chunk.len;
        net_list_u8_free(&chunk);
    }
    return 1;
}

// One HTTP/2 frame: TYPE with FLAGS on STREAM, carrying LEN bytes of PAYLOAD.
static void h2_frame(wasi_io_streams_own_output_stream_t out, uint8_t type, uint8_t flags, uint32_t stream,
                     const uint8_t *payload, size_t len) {
    uint8_t f[9 + 64];
    if (len > 64) return;
    f[0] = (uint8_t)(len >> 16), f[1] = (uint8_t)(len >> 8), f[2] = (uint8_t)len;
    f[3] = type, f[4] = flags;
    f[5] = (uint8_t)(stream >> 24), f[6] = (uint8_t)(stream >> 16), f[7] = (uint8_t)(stream >> 8), f[8] = (uint8_t)stream;
    memcpy(f + 9, payload, len);
    write_all(out, (const char *)f, 9 + len);
}

// Just enough HTTP/2 for unary gRPC calls: settings and pings are acknowledged, and each
// stream the client ends is answered with a HealthCheckResponse (status 2 while *LEFT > 0,
// then 1) and grpc-status 0. The request itself is not decoded: every call is a Check.
static void grpc_health_conn(wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn,
                             int *left) {
    static uint8_t payload[16384];
    uint8_t head[9];
    if (!read_exact(conn.f1, payload, 24) || memcmp(payload, "PRI * HTTP/2.0", 14)) return;
    h2_frame(conn.f2, 4, 0, 0, NULL, 0);
    while (read_exact(conn.f1, head, 9)) {
        size_t len = (size_t)head[0] << 16 | (size_t)head[1] << 8 | head[2];
        uint8_t type = head[3], flags = head[4];
        uint32_t stream = ((uint32_t)head[5] << 24 | (uint32_t)head[6] << 16 | (uint32_t)head[7] << 8 | head[8]) &
                          0x7fffffff;
        if (len > sizeof payload || !read_exact(conn.f1, payload, len)) return;
        if (type == 4 && !(flags & 1)) h2_frame(conn.f2, 4, 1, 0, NULL, 0);
        if (type == 6 && !(flags & 1) && len == 8) h2_frame(conn.f2, 6, 1, 0, payload, 8);
        if (type == 7) return;
        if ((type == 0 || type == 1) && (flags & 1)) {
            int status = *left > 0 ? 2 : 1;
            if (*left > 0) (*left)--;
            // HPACK: ":status: 200" from the static table, the rest literal, never Huffman.
            static const uint8_t headers[] = "\x88\x00\x0c" "content-type" "\x10" "application/grpc";
            static const uint8_t trailers[] = "\x00\x0b" "grpc-status" "\x01" "0";
            uint8_t message[] = {0, 0, 0, 0, 2, 0x08, (uint8_t)status};
            h2_frame(conn.f2, 1, 4, stream, headers, sizeof headers - 1);
            h2_frame(conn.f2, 0, 0, stream, message, sizeof message);
            h2_frame(conn.f2, 1, 5, stream, trailers, sizeof trailers - 1);
            printf("answered %s\n", status == 1 ? "SERVING" : "NOT_SERVING");
            fflush(stdout);
        }
    }
}

static int grpc_health(int port, int not_serving) {
    wasi_sockets_tcp_own_tcp_socket_t sock;
    if (listen_on(port, &sock)) return 1;
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    for (;;) {
        wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn = accept_on(s);
        grpc_health_conn(conn, &not_serving);
        close_conn(conn);
    }
}

// Connects to HOST:PORT: the socket and its streams in *sock and *io.
static int dial(const char *host, int port, wasi_sockets_tcp_own_tcp_socket_t *sockp,
                wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t *iop) {
    wasi_sockets_network_ip_address_t addrs[8];
    int n = lookup(host, addrs, 8);
    if (n <= 0) {
        fprintf(stderr, "no address for %s\n", host);
        return 1;
    }
    int i = 0;
    while (i < n && addrs[i].tag != WASI_SOCKETS_NETWORK_IP_ADDRESS_IPV4) i++;
    if (i == n) {
        fprintf(stderr, "no IPv4 address for %s\n", host);
        return 1;
    }
    wasi_sockets_tcp_own_tcp_socket_t sock;
    wasi_sockets_tcp_error_code_t err;
    if (!wasi_sockets_tcp_create_socket_create_tcp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &sock, &err))
        return fail("create socket", err);
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    wasi_sockets_tcp_ip_socket_address_t addr = ipv4(addrs[i].val.ipv4, port);
    if (!wasi_sockets_tcp_method_tcp_socket_start_connect(s, network(), &addr, &err)) {
        wasi_sockets_tcp_tcp_socket_drop_own(sock);
        return fail("connect", err);
    }
    wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
    while (!wasi_sockets_tcp_method_tcp_socket_finish_connect(s, &io, &err)) {
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
            wasi_sockets_tcp_tcp_socket_drop_own(sock);
            return fail("connect", err);
        }
        block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(s));
    }
    *sockp = sock;
    *iop = io;
    return 0;
}

// Connects to HOST:PORT, sends MSG and reads the answer into buf (NUL-terminated).
static int ask(const char *host, int port, const char *msg, char *buf, size_t cap) {
    wasi_sockets_tcp_own_tcp_socket_t sock;
    wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
    if (dial(host, port, &sock, &io)) return 1;
    write_all(io.f1, msg, strlen(msg));
    read_some(io.f0, buf, cap);
    wasi_io_streams_input_stream_drop_own(io.f0);
    wasi_io_streams_output_stream_drop_own(io.f1);
    wasi_sockets_tcp_tcp_socket_drop_own(sock);
    return 0;
}

static int connect_to(const char *host, int port, const char *msg) {
    char buf[1024];
    if (ask(host, port, msg, buf, sizeof buf)) return 1;
    printf("%s\n", buf);
    return 0;
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

// N requests, one connection each, timed with the monotonic clock.
static int bench_connect(const char *host, int port, int n, const char *msg) {
    if (n <= 0 || n > 1000000) return 2;
    uint64_t *took = malloc(sizeof(uint64_t) * (size_t)n);
    if (!took) return 1;
    char buf[1024];
    uint64_t start = wasi_clocks_monotonic_clock_now();
    for (int i = 0; i < n; i++) {
        uint64_t t0 = wasi_clocks_monotonic_clock_now();
        if (ask(host, port, msg, buf, sizeof buf)) return 1;
        took[i] = wasi_clocks_monotonic_clock_now() - t0;
    }
    uint64_t total = wasi_clocks_monotonic_clock_now() - start;
    qsort(took, (size_t)n, sizeof(uint64_t), by_value);
    printf("requests=%d rps=%.0f p50_us=%.1f p99_us=%.1f\n", n, n / (total / 1e9), took[n / 2] / 1e3,
           took[(size_t)((n - 1) * 0.99)] / 1e3);
    return 0;
}

// Sends MB mebibytes to HOST:PORT (a sink), ends its side and prints the rate and the count
// the sink answered.
static int blast(const char *host, int port, int mb) {
    static uint8_t chunk[65536];
    wasi_sockets_tcp_own_tcp_socket_t sock;
    wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
    if (dial(host, port, &sock, &io)) return 1;
    wasi_io_streams_borrow_output_stream_t out = wasi_io_streams_borrow_output_stream(io.f1);
    uint64_t left = (uint64_t)mb << 20, start = wasi_clocks_monotonic_clock_now();
    while (left > 0) {
        uint64_t room;
        wasi_io_streams_stream_error_t err;
        if (!wasi_io_streams_method_output_stream_check_write(out, &room, &err)) return fail("write", 0);
        if (room == 0) {
            block_on(wasi_io_streams_method_output_stream_subscribe(out));
            continue;
        }
        uint64_t n = room < left ? room : left;
        if (n > sizeof chunk) n = sizeof chunk;
        net_list_u8_t bytes = {chunk, (size_t)n};
        if (!wasi_io_streams_method_output_stream_write(out, &bytes, &err)) return fail("write", 0);
        left -= n;
    }
    wasi_io_streams_stream_error_t ferr;
    wasi_io_streams_method_output_stream_blocking_flush(out, &ferr);
    wasi_sockets_tcp_error_code_t err;
    wasi_sockets_tcp_method_tcp_socket_shutdown(wasi_sockets_tcp_borrow_tcp_socket(sock), WASI_SOCKETS_TCP_SHUTDOWN_TYPE_SEND, &err);
    char answer[64];
    read_some(io.f0, answer, sizeof answer);
    double secs = (wasi_clocks_monotonic_clock_now() - start) / 1e9;
    printf("sent %d MiB in %.3f s: %.1f MiB/s; the sink counted %s", mb, secs, mb / secs, answer);
    return 0;
}

static int udp_echo(int port) {
    wasi_sockets_udp_own_udp_socket_t sock;
    wasi_sockets_udp_error_code_t err;
    if (!wasi_sockets_udp_create_socket_create_udp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &sock, &err))
        return fail("create udp socket", err);
    wasi_sockets_udp_borrow_udp_socket_t s = wasi_sockets_udp_borrow_udp_socket(sock);
    wasi_sockets_udp_ip_socket_address_t addr = ipv4(ANY, port);
    if (!wasi_sockets_udp_method_udp_socket_start_bind(s, network(), &addr, &err)) return fail("udp bind", err);
    while (!wasi_sockets_udp_method_udp_socket_finish_bind(s, &err)) {
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) return fail("udp bind", err);
        block_on(wasi_sockets_udp_method_udp_socket_subscribe(s));
    }
    wasi_sockets_udp_tuple2_own_incoming_datagram_stream_own_outgoing_datagram_stream_t streams;
    if (!wasi_sockets_udp_method_udp_socket_stream(s, NULL, &streams, &err)) return fail("udp stream", err);
    wasi_sockets_udp_borrow_incoming_datagram_stream_t in = wasi_sockets_udp_borrow_incoming_datagram_stream(streams.f0);
    wasi_sockets_udp_borrow_outgoing_datagram_stream_t out = wasi_sockets_udp_borrow_outgoing_datagram_stream(streams.f1);
    printf("udp listening on %d\n", port);
    fflush(stdout);
    const char *me = getenv("HOSTNAME");
    for (;;) {
        wasi_sockets_udp_list_incoming_datagram_t got;
        if (!wasi_sockets_udp_method_incoming_datagram_stream_receive(in, 8, &got, &err)) return fail("udp receive", err);
        if (got.len == 0) {
            block_on(wasi_sockets_udp_method_incoming_datagram_stream_subscribe(in));
            continue;
        }
        for (size_t i = 0; i < got.len; i++) {
            char reply[1200];
            int n = snprintf(reply, sizeof reply, "%s echoes %.*s", me ? me : "?", (int)got.ptr[i].data.len,
                             (const char *)got.ptr[i].data.ptr);
            uint64_t room = 0;
            while (wasi_sockets_udp_method_outgoing_datagram_stream_check_send(out, &room, &err) && room == 0)
                block_on(wasi_sockets_udp_method_outgoing_datagram_stream_subscribe(out));
            wasi_sockets_udp_outgoing_datagram_t d;
            d.data.ptr = (uint8_t *)reply;
            d.data.len = (size_t)n;
            d.remote_address.is_some = true;
            d.remote_address.val = got.ptr[i].remote_address;
            wasi_sockets_udp_list_outgoing_datagram_t list = {&d, 1};
            uint64_t sent;
            wasi_sockets_udp_method_outgoing_datagram_stream_send(out, &list, &sent, &err);
        }
        wasi_sockets_udp_list_incoming_datagram_free(&got);
    }
}

static void print_addr(const char *before, wasi_sockets_network_ip_socket_address_t *a, const char *after) {
    wasi_sockets_network_ipv4_socket_address_t v = a->val.ipv4;
    printf("%s%u.%u.%u.%u:%u%s", before, v.address.f0, v.address.f1, v.address.f2, v.address.f3, v.port, after);
}

// One datagram to HOST:PORT and its answer (see udp-ask above).
static int udp_ask(const char *host, int port, const char *msg, int connected) {
    wasi_sockets_network_ip_address_t addrs[8];
    int n = lookup(host, addrs, 8), i = 0;
    while (i < n && addrs[i].tag != WASI_SOCKETS_NETWORK_IP_ADDRESS_IPV4) i++;
    if (n <= 0 || i == n) {
        fprintf(stderr, "no IPv4 address for %s\n", host);
        return 1;
    }
    wasi_sockets_udp_ip_socket_address_t to = ipv4(addrs[i].val.ipv4, port);
    wasi_sockets_udp_own_udp_socket_t sock;
    wasi_sockets_udp_error_code_t err;
    if (!wasi_sockets_udp_create_socket_create_udp_socket(WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &sock, &err))
        return fail("create udp socket", err);
    wasi_sockets_udp_borrow_udp_socket_t s = wasi_sockets_udp_borrow_udp_socket(sock);
    wasi_sockets_udp_ip_socket_address_t any = ipv4(ANY, 0);
    if (!wasi_sockets_udp_method_udp_socket_start_bind(s, network(), &any, &err)) return fail("udp bind", err);
    while (!wasi_sockets_udp_method_udp_socket_finish_bind(s, &err)) {
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) return fail("udp bind", err);
        block_on(wasi_sockets_udp_method_udp_socket_subscribe(s));
    }
    wasi_sockets_udp_tuple2_own_incoming_datagram_stream_own_outgoing_datagram_stream_t streams;
    if (!wasi_sockets_udp_method_udp_socket_stream(s, connected ? &to : NULL, &streams, &err))
        return fail("udp stream", err);
    if (connected) {
        wasi_sockets_udp_ip_socket_address_t remote;
        if (!wasi_sockets_udp_method_udp_socket_remote_address(s, &remote, &err)) return fail("remote address", err);
        print_addr("remote ", &remote, "\n");
    }
    wasi_sockets_udp_borrow_incoming_datagram_stream_t in = wasi_sockets_udp_borrow_incoming_datagram_stream(streams.f0);
    wasi_sockets_udp_borrow_outgoing_datagram_stream_t out = wasi_sockets_udp_borrow_outgoing_datagram_stream(streams.f1);
    uint64_t room = 0, sent = 0;
    while (wasi_sockets_udp_method_outgoing_datagram_stream_check_send(out, &room, &err) && room == 0)
        block_on(wasi_sockets_udp_method_outgoing_datagram_stream_subscribe(out));
    wasi_sockets_udp_outgoing_datagram_t d;
    d.data.ptr = (uint8_t *)msg;
    d.data.len = strlen(msg);
    d.remote_address.is_some = !connected;
    d.remote_address.val = to;
    wasi_sockets_udp_list_outgoing_datagram_t list = {&d, 1};
    if (!wasi_sockets_udp_method_outgoing_datagram_stream_send(out, &list, &sent, &err)) return fail("udp send", err);
    uint64_t deadline = wasi_clocks_monotonic_clock_now() + 3000000000ull;
    for (;;) {
        wasi_sockets_udp_list_incoming_datagram_t got;
        if (!wasi_sockets_udp_method_incoming_datagram_stream_receive(in, 1, &got, &err)) return fail("udp receive", err);
        if (got.len > 0) {
            printf("%.*s", (int)got.ptr[0].data.len, (const char *)got.ptr[0].data.ptr);
            print_addr(" from ", &got.ptr[0].remote_address, "\n");
            wasi_sockets_udp_list_incoming_datagram_free(&got);
            return 0;
        }
        uint64_t now = wasi_clocks_monotonic_clock_now();
        if (now >= deadline) {
            printf("no answer\n");
            return 1;
        }
        wasi_io_poll_own_pollable_t both[2] = {
            wasi_sockets_udp_method_incoming_datagram_stream_subscribe(in),
            wasi_clocks_monotonic_clock_subscribe_instant(deadline),
        };
        wasi_io_poll_borrow_pollable_t borrowed[2] = {wasi_io_poll_borrow_pollable(both[0]),
                                                      wasi_io_poll_borrow_pollable(both[1])};
        wasi_io_poll_list_borrow_pollable_t polled = {borrowed, 2};
        net_list_u32_t ready;
        wasi_io_poll_poll(&polled, &ready);
        net_list_u32_free(&ready);
        wasi_io_poll_pollable_drop_own(both[0]);
        wasi_io_poll_pollable_drop_own(both[1]);
    }
}

// Run as httpd (the conformance images' web server, argv[0] .../httpd[.wasm]): serves HTTP on
// port 80, after logging its command line as Apache's httpd does when it starts.
static int httpd(int argc, char **argv) {
    printf("httpd: started; command line: 'httpd");
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("'\n");
    fflush(stdout);
    return serve(80);
}

int main(int argc, char **argv) {
    const char *me = argc ? strrchr(argv[0], '/') : NULL;
    me = me ? me + 1 : (argc ? argv[0] : "");
    if (!strcmp(me, "httpd") || !strcmp(me, "httpd.wasm")) return httpd(argc, argv);
    // Exec'd as `CMD ARGS...` (a kubelet's exec runs the container's module with argv = cmd):
    // the command is argv[0].
    static char *shifted[64];
    if (argc < 62 && (!strcmp(me, "connect") || !strcmp(me, "connect-n") || !strcmp(me, "ready") || !strcmp(me, "bench-connect") ||
        !strcmp(me, "lookup") || !strcmp(me, "udp-ask"))) {
        shifted[0] = "net";
        for (int i = 0; i <= argc; i++) shifted[i + 1] = argv[i];
        argv = shifted;
        argc++;
    }
    if (argc >= 3 && !strcmp(argv[1], "serve")) {
        stubborn = argc >= 4 && !strcmp(argv[3], "stubborn");
        return serve(atoi(argv[2]));
    }
    if (argc >= 3 && !strcmp(argv[1], "udp-echo")) return udp_echo(atoi(argv[2]));
    if (argc >= 3 && !strcmp(argv[1], "hold")) return hold(atoi(argv[2]));
    if (argc >= 6 && !strcmp(argv[1], "udp-ask"))
        return udp_ask(argv[2], atoi(argv[3]), argv[4], !strcmp(argv[5], "connected"));
    if (argc >= 3 && !strcmp(argv[1], "sink")) return sink(atoi(argv[2]));
    if (argc >= 4 && !strcmp(argv[1], "grpc-health")) return grpc_health(atoi(argv[2]), atoi(argv[3]));
    if (argc >= 5 && !strcmp(argv[1], "connect")) return connect_to(argv[2], atoi(argv[3]), argv[4]);
    if (argc >= 6 && !strcmp(argv[1], "connect-n")) {
        for (int i = atoi(argv[4]); i > 0; i--) {
            if (connect_to(argv[2], atoi(argv[3]), argv[5])) return 1;
            fflush(stdout);
        }
        return 0;
    }
    if (argc >= 5 && !strcmp(argv[1], "blast")) return blast(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc >= 6 && !strcmp(argv[1], "bench-connect")) return bench_connect(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
    if (argc >= 3 && !strcmp(argv[1], "ready")) {
        // (No libc file calls here: linking them breaks the sockets of this component.)
        char answer[64];
        if (ask("localhost", atoi(argv[2]), "ready?", answer, sizeof answer)) return 1;
        return strcmp(answer, "yes") == 0 ? 0 : 1;
    }
    if (argc >= 3 && !strcmp(argv[1], "lookup")) {
        wasi_sockets_network_ip_address_t addrs[16];
        int n = lookup(argv[2], addrs, 16);
        if (n < 0) return 1;
        for (int i = 0; i < n; i++) print_ip(&addrs[i]);
        return 0;
    }
    fprintf(stderr, "usage: net serve PORT | sink PORT | udp-echo PORT | udp-ask HOST PORT MSG connected|unconnected | grpc-health PORT N | connect HOST PORT MSG | connect-n HOST PORT N MSG | bench-connect HOST PORT N MSG | blast HOST PORT MB | lookup NAME | ready PORT\n");
    return 2;
}
