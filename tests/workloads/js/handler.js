// A wasi:http handler in JavaScript (the fetch event of StarlingMonkey).
addEventListener('fetch', (event) => {
  const url = new URL(event.request.url);
  event.respondWith(new Response(`hello from js at ${url.pathname}\n`, { headers: { 'content-type': 'text/plain' } }));
});
