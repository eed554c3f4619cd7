;; The README's example workload: a WASI preview 1 module that greets whoever its first
;; argument names (or "world") on stdout, written in WAT so that it needs no wasm toolchain.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0..16: iovecs; 16..24: argc, argv_buf_size; 64..: "hello, "; 1024..: argv pointers; 2048..: argv bytes
  (data (i32.const 64) "hello, ")
  (data (i32.const 80) "world")
  (data (i32.const 96) " from wasm\n")
  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $n))
  (func (export "_start") (local $name i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (call $write (i32.const 64) (i32.const 7))
    (if (i32.ge_u (i32.load (i32.const 16)) (i32.const 2))
      (then
        (local.set $name (i32.load (i32.const 1028)))
        (call $write (local.get $name) (call $strlen (local.get $name))))
      (else (call $write (i32.const 80) (i32.const 5))))
    (call $write (i32.const 96) (i32.const 11))))
