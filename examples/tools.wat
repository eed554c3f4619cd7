;; The README example's small tools: a WASI preview 1 command written in WAT, so that it needs
;; no toolchain.
;;   write FILE TEXT    writes TEXT and a newline to FILE (under one of the container's mounts)
;;   cat FILE [CODE]    prints FILE, then exits with CODE (0 if not given)
;;   tick SECONDS TEXT  prints TEXT every SECONDS seconds, forever
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $fd_prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; 0..16: iovec and counts; 16..32: argc, argv size, prestat; 64..112: a clock subscription;
  ;; 128..160: its event; 256..: text; 1024..: argv pointers; 2048..: argv bytes;
  ;; 8192..: a preopen's name; 12288..: file contents (up to 16 KiB).
  (data (i32.const 256) "write")
  (data (i32.const 264) "cat")
  (data (i32.const 272) "tick")
  (data (i32.const 280) "\n")
  (data (i32.const 288) "usage: tools write FILE TEXT | cat FILE [CODE] | tick SECONDS TEXT\n")
  (data (i32.const 384) "tools: no mount holds ")

  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))

  ;; Whether the $len bytes at $p and at $q are the same.
  (func $same (param $p i32) (param $q i32) (param $len i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br_if $differ (i32.ne (i32.load8_u (i32.add (local.get $p) (local.get $len)))
                               (i32.load8_u (i32.add (local.get $q) (local.get $len)))))
        (br $next)))
    (i32.const 0))

  ;; Whether the NUL-terminated string at $p is the $len bytes at $q.
  (func $is (param $p i32) (param $q i32) (param $len i32) (result i32)
    (i32.and (i32.eq (call $strlen (local.get $p)) (local.get $len))
             (call $same (local.get $p) (local.get $q) (local.get $len))))

  (func $number (param $p i32) (result i32) (local $n i32) (local $c i32)
    (block $done
      (loop $next
        (local.set $c (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10)) (local.get $c)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $n))

  (func $arg (param $i i32) (result i32)
    (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 2)))))

  ;; Opens the absolute path $path through the preopened directory that holds it, with
  ;; $oflags and $rights; exits 1 if no preopen holds it or the open fails.
  (func $open (param $path i32) (param $oflags i32) (param $rights i64) (result i32)
    (local $fd i32) (local $len i32)
    (local.set $fd (i32.const 3))
    (block $none
      (loop $next
        (br_if $none (call $fd_prestat_get (local.get $fd) (i32.const 16)))
        (local.set $len (i32.load (i32.const 20)))
        (if (i32.and
              (i32.le_u (local.get $len) (i32.const 256))
              (i32.eqz (call $fd_prestat_dir_name (local.get $fd) (i32.const 8192) (local.get $len))))
          (then
            ;; The preopen's name must be $path's prefix, followed by "/".
            (if (i32.and
                  (call $same (local.get $path) (i32.const 8192) (local.get $len))
                  (i32.eq (i32.load8_u (i32.add (local.get $path) (local.get $len))) (i32.const 47)))
              (then
                (local.set $path (i32.add (local.get $path) (i32.add (local.get $len) (i32.const 1))))
                (br_if $none (call $path_open (local.get $fd) (i32.const 1) (local.get $path)
                  (call $strlen (local.get $path)) (local.get $oflags) (local.get $rights) (i64.const 0)
                  (i32.const 0) (i32.const 24)))
                (return (i32.load (i32.const 24)))))))
        (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
        (br $next)))
    (call $write (i32.const 2) (i32.const 384) (i32.const 22))
    (call $write (i32.const 2) (local.get $path) (call $strlen (local.get $path)))
    (call $write (i32.const 2) (i32.const 280) (i32.const 1))
    (call $proc_exit (i32.const 1))
    (unreachable))

  (func $usage
    (call $write (i32.const 2) (i32.const 288) (i32.const 67))
    (call $proc_exit (i32.const 2)))

  (func (export "_start") (local $argc i32) (local $cmd i32) (local $fd i32) (local $text i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $argc (i32.load (i32.const 16)))
    (if (i32.or (i32.lt_u (local.get $argc) (i32.const 3)) (i32.gt_u (local.get $argc) (i32.const 256)))
      (then (call $usage)))
    (if (i32.gt_u (i32.load (i32.const 20)) (i32.const 6144)) (then (call $usage)))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (local.set $cmd (call $arg (i32.const 1)))
    ;; write FILE TEXT: create or truncate, with the right to write (fd_write is 1 << 6).
    (if (i32.and (call $is (local.get $cmd) (i32.const 256) (i32.const 5)) (i32.ge_u (local.get $argc) (i32.const 4)))
      (then
        (local.set $fd (call $open (call $arg (i32.const 2)) (i32.const 9) (i64.const 64)))
        (local.set $text (call $arg (i32.const 3)))
        (call $write (local.get $fd) (local.get $text) (call $strlen (local.get $text)))
        (call $write (local.get $fd) (i32.const 280) (i32.const 1))
        (return)))
    ;; cat FILE [CODE]: with the right to read (fd_read is 1 << 1).
    (if (call $is (local.get $cmd) (i32.const 264) (i32.const 3))
      (then
        (local.set $fd (call $open (call $arg (i32.const 2)) (i32.const 0) (i64.const 2)))
        (i32.store (i32.const 0) (i32.const 12288))
        (i32.store (i32.const 4) (i32.const 16384))
        (i32.store (i32.const 8) (i32.const 0))
        (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $write (i32.const 1) (i32.const 12288) (i32.load (i32.const 8)))
        (if (i32.ge_u (local.get $argc) (i32.const 4))
          (then (call $proc_exit (call $number (call $arg (i32.const 3))))))
        (return)))
    ;; tick SECONDS TEXT: a relative clock subscription on the monotonic clock (id 1).
    (if (i32.and (call $is (local.get $cmd) (i32.const 272) (i32.const 4)) (i32.ge_u (local.get $argc) (i32.const 4)))
      (then
        (local.set $text (call $arg (i32.const 3)))
        (i32.store8 (i32.const 72) (i32.const 0))
        (i32.store (i32.const 80) (i32.const 1))
        (i64.store (i32.const 88)
          (i64.mul (i64.extend_i32_u (call $number (call $arg (i32.const 2)))) (i64.const 1000000000)))
        (i64.store (i32.const 96) (i64.const 0))
        (i32.store16 (i32.const 104) (i32.const 0))
        (loop $forever
          (call $write (i32.const 1) (local.get $text) (call $strlen (local.get $text)))
          (call $write (i32.const 1) (i32.const 280) (i32.const 1))
          (drop (call $poll_oneoff (i32.const 64) (i32.const 128) (i32.const 1) (i32.const 12)))
          (br $forever))))
    (call $usage)))
