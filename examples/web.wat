;; The README example's web server: a wasi:http handler (wasi:http/proxy) written by hand as a
;; component in WAT, so that it needs no toolchain. It answers every request with 200 and a
;; greeting, and writes "served PATH" to stdout, so the probes and hooks that reach it show in
;; its log.
(component
  ;; The imports: only the parts of each interface it uses (an instance import may name a
  ;; subset of what the host offers).
  (import "wasi:io/error@0.2.12" (instance $io-error
    (export "error" (type (sub resource)))))
  (alias export $io-error "error" (type $error))

  (import "wasi:io/streams@0.2.12" (instance $streams
    (export "output-stream" (type $output-stream (sub resource)))
    (alias outer 1 $error (type $error-outer))
    (export "error" (type $error (eq $error-outer)))
    (type $stream-error' (variant (case "last-operation-failed" (own $error)) (case "closed")))
    (export "stream-error" (type $stream-error (eq $stream-error')))
    (export "[method]output-stream.blocking-write-and-flush"
      (func (param "self" (borrow $output-stream)) (param "contents" (list u8))
            (result (result (error $stream-error)))))))
  (alias export $streams "output-stream" (type $output-stream))

  (import "wasi:cli/stdout@0.2.12" (instance $stdout
    (alias outer 1 $output-stream (type $output-stream-outer))
    (export "output-stream" (type $output-stream (eq $output-stream-outer)))
    (export "get-stdout" (func (result (own $output-stream))))))

  (import "wasi:http/types@0.2.12" (instance $http
    (export "incoming-request" (type $incoming-request (sub resource)))
    (export "fields" (type $fields (sub resource)))
    (export "headers" (type $headers (eq $fields)))
    (export "outgoing-response" (type $outgoing-response (sub resource)))
    (type $u16 u16)
    (export "status-code" (type $status-code (eq $u16)))
    (export "outgoing-body" (type $outgoing-body (sub resource)))
    (alias outer 1 $output-stream (type $output-stream-outer))
    (export "output-stream" (type $output-stream (eq $output-stream-outer)))
    (export "response-outparam" (type $response-outparam (sub resource)))
    ;; error-code and its payloads, as wasi:http/types defines them.
    (type $dns-error' (record (field "rcode" (option string)) (field "info-code" (option u16))))
    (export "DNS-error-payload" (type $dns-error (eq $dns-error')))
    (type $tls-alert' (record (field "alert-id" (option u8)) (field "alert-message" (option string))))
    (export "TLS-alert-received-payload" (type $tls-alert (eq $tls-alert')))
    (type $field-size' (record (field "field-name" (option string)) (field "field-size" (option u32))))
    (export "field-size-payload" (type $field-size (eq $field-size')))
    (type $error-code' (variant
      (case "DNS-timeout") (case "DNS-error" $dns-error)
      (case "destination-not-found") (case "destination-unavailable")
      (case "destination-IP-prohibited") (case "destination-IP-unroutable")
      (case "connection-refused") (case "connection-terminated") (case "connection-timeout")
      (case "connection-read-timeout") (case "connection-write-timeout")
      (case "connection-limit-reached")
      (case "TLS-protocol-error") (case "TLS-certificate-error") (case "TLS-alert-received" $tls-alert)
      (case "HTTP-request-denied") (case "HTTP-request-length-required")
      (case "HTTP-request-body-size" (option u64))
      (case "HTTP-request-method-invalid") (case "HTTP-request-URI-invalid")
      (case "HTTP-request-URI-too-long")
      (case "HTTP-request-header-section-size" (option u32))
      (case "HTTP-request-header-size" (option $field-size))
      (case "HTTP-request-trailer-section-size" (option u32))
      (case "HTTP-request-trailer-size" $field-size)
      (case "HTTP-response-incomplete")
      (case "HTTP-response-header-section-size" (option u32))
      (case "HTTP-response-header-size" $field-size)
      (case "HTTP-response-body-size" (option u64))
      (case "HTTP-response-trailer-section-size" (option u32))
      (case "HTTP-response-trailer-size" $field-size)
      (case "HTTP-response-transfer-coding" (option string))
      (case "HTTP-response-content-coding" (option string))
      (case "HTTP-response-timeout") (case "HTTP-upgrade-failed") (case "HTTP-protocol-error")
      (case "loop-detected") (case "configuration-error")
      (case "internal-error" (option string))))
    (export "error-code" (type $error-code (eq $error-code')))
    (export "trailers" (type $trailers (eq $fields)))
    (export "[constructor]fields" (func (result (own $fields))))
    (export "[method]incoming-request.path-with-query"
      (func (param "self" (borrow $incoming-request)) (result (option string))))
    (export "[static]response-outparam.set"
      (func (param "param" (own $response-outparam))
            (param "response" (result (own $outgoing-response) (error $error-code)))))
    (export "[constructor]outgoing-response"
      (func (param "headers" (own $headers)) (result (own $outgoing-response))))
    (export "[method]outgoing-response.set-status-code"
      (func (param "self" (borrow $outgoing-response)) (param "status-code" $status-code) (result (result))))
    (export "[method]outgoing-response.body"
      (func (param "self" (borrow $outgoing-response)) (result (result (own $outgoing-body)))))
    (export "[method]outgoing-body.write"
      (func (param "self" (borrow $outgoing-body)) (result (result (own $output-stream)))))
    (export "[static]outgoing-body.finish"
      (func (param "this" (own $outgoing-body)) (param "trailers" (option (own $trailers)))
            (result (result (error $error-code)))))))
  (alias export $http "incoming-request" (type $incoming-request))
  (alias export $http "response-outparam" (type $response-outparam))

  ;; Linear memory and the allocator the host uses to hand back strings, in a module of their
  ;; own so that the imports can be lowered before the main module is instantiated.
  (core module $Memory
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 8192))
    ;; cabi_realloc(old, old_size, align, size): a bump allocator; an instance serves one request.
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $next) (i32.sub (local.get 2) (i32.const 1)))
                             (i32.sub (i32.const 0) (local.get 2))))
      (global.set $next (i32.add (local.get $p) (local.get 3)))
      (local.get $p)))
  (core instance $memory (instantiate $Memory))
  (alias core export $memory "memory" (core memory $mem))
  (alias core export $memory "realloc" (core func $realloc))

  (core func $path (canon lower (func $http "[method]incoming-request.path-with-query")
    (memory $mem) (realloc $realloc)))
  (core func $drop-request (canon resource.drop $incoming-request))
  (core func $fields (canon lower (func $http "[constructor]fields")))
  (core func $response (canon lower (func $http "[constructor]outgoing-response")))
  (core func $set-status (canon lower (func $http "[method]outgoing-response.set-status-code")))
  (core func $body (canon lower (func $http "[method]outgoing-response.body") (memory $mem)))
  (core func $body-stream (canon lower (func $http "[method]outgoing-body.write") (memory $mem)))
  (core func $set-response (canon lower (func $http "[static]response-outparam.set") (memory $mem)))
  (core func $finish (canon lower (func $http "[static]outgoing-body.finish") (memory $mem)
    (realloc $realloc)))
  (core func $write (canon lower (func $streams "[method]output-stream.blocking-write-and-flush")
    (memory $mem)))
  (core func $drop-stream (canon resource.drop $output-stream))
  (core func $stdout (canon lower (func $stdout "get-stdout")))
  (core instance $imports
    (export "memory" (memory $mem))
    (export "path" (func $path))
    (export "drop-request" (func $drop-request))
    (export "fields" (func $fields))
    (export "response" (func $response))
    (export "set-status" (func $set-status))
    (export "body" (func $body))
    (export "body-stream" (func $body-stream))
    (export "set-response" (func $set-response))
    (export "finish" (func $finish))
    (export "write" (func $write))
    (export "drop-stream" (func $drop-stream))
    (export "stdout" (func $stdout)))

  (core module $Main
    (import "host" "memory" (memory 1))
    (import "host" "path" (func $path (param i32 i32)))
    (import "host" "drop-request" (func $drop-request (param i32)))
    (import "host" "fields" (func $fields (result i32)))
    (import "host" "response" (func $response (param i32) (result i32)))
    (import "host" "set-status" (func $set-status (param i32 i32) (result i32)))
    (import "host" "body" (func $body (param i32 i32)))
    (import "host" "body-stream" (func $body-stream (param i32 i32)))
    (import "host" "set-response" (func $set-response (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
    (import "host" "finish" (func $finish (param i32 i32 i32 i32)))
    (import "host" "write" (func $write (param i32 i32 i32 i32)))
    (import "host" "drop-stream" (func $drop-stream (param i32)))
    (import "host" "stdout" (func $stdout (result i32)))
    ;; 0..128: results the host writes back; 1024..: constant text; 4096..: the log line.
    (data (i32.const 1024) "served ")
    (data (i32.const 1040) "hello from a wasi:http component\n")
    (func (export "handle") (param $request i32) (param $out i32)
      (local $len i32) (local $response i32) (local $body i32) (local $stream i32)
      ;; The log line: "served PATH\n".
      (call $path (local.get $request) (i32.const 16))
      (memory.copy (i32.const 4096) (i32.const 1024) (i32.const 7))
      (local.set $len (i32.const 7))
      (if (i32.load8_u (i32.const 16))
        (then
          (memory.copy (i32.const 4103) (i32.load (i32.const 20)) (i32.load (i32.const 24)))
          (local.set $len (i32.add (local.get $len) (i32.load (i32.const 24))))))
      (i32.store8 (i32.add (i32.const 4096) (local.get $len)) (i32.const 10))
      (local.set $stream (call $stdout))
      (call $write (local.get $stream) (i32.const 4096) (i32.add (local.get $len) (i32.const 1)) (i32.const 32))
      (call $drop-stream (local.get $stream))
      (call $drop-request (local.get $request))
      ;; 200 with a body: the response goes out first, its body streams after.
      (local.set $response (call $response (call $fields)))
      (drop (call $set-status (local.get $response) (i32.const 200)))
      (call $body (local.get $response) (i32.const 40))
      (local.set $body (i32.load (i32.const 44)))
      (call $body-stream (local.get $body) (i32.const 48))
      (local.set $stream (i32.load (i32.const 52)))
      ;; result::ok(response), the error-code payload slots unused.
      (call $set-response (local.get $out) (i32.const 0) (local.get $response)
        (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
      (call $write (local.get $stream) (i32.const 1040) (i32.const 34) (i32.const 32))
      (call $drop-stream (local.get $stream))
      (call $finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 64))))
  (core instance $main (instantiate $Main (with "host" (instance $imports))))

  (func $handle (param "request" (own $incoming-request)) (param "response-out" (own $response-outparam))
    (canon lift (core func $main "handle")))
  (instance $handler
    (export "incoming-request" (type $incoming-request))
    (export "response-outparam" (type $response-outparam))
    (export "handle" (func $handle)))
  (export "wasi:http/incoming-handler@0.2.12" (instance $handler)))
