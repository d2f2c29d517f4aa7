// Microsoft's hyco-https listener, unmodified, for relayd's interop tests
// (tests/interop/test_hyco.py).
//
//   node https_listener.js NS PATH RULE KEY
//       prints "listening" once its control channel is up; answers each
//       request with 200 and "METHOD URL BODYLENGTH SHA256", except:
//       /big/N answers N bytes, in writes of 64 KiB; /created answers 201
//       "Created" with an x-echo-len header.
'use strict';
const crypto = require('crypto');
const https = require('hyco-https');

const [ns, path, rule, key] = process.argv.slice(2);
const uri = https.createRelayListenUri(ns, path);
const server = https.createRelayedServer({
  server: uri,
  token: () => https.createRelayToken(uri, rule, key),
}, (req, res) => {
  const hash = crypto.createHash('sha256');
  let length = 0;
  req.on('data', (chunk) => { length += chunk.length; hash.update(chunk); });
  req.on('end', () => {
    const big = /\/big\/(\d+)$/.exec(req.url);
    if (big) {
      let left = Number(big[1]);
      res.setHeader('Content-Type', 'application/octet-stream');
      const piece = Buffer.alloc(65536, 'x');
      while (left > 0) {
        const n = Math.min(left, piece.length);
        res.write(piece.subarray(0, n));
        left -= n;
      }
      res.end();
    } else if (req.url.endsWith('/created')) {
      res.statusCode = 201;
      res.statusMessage = 'Created';
      res.setHeader('x-echo-len', String(length));
      res.end('made');
    } else {
      res.setHeader('Content-Type', 'text/plain');
      res.end(`${req.method} ${req.url} ${length} ${hash.digest('hex')}`);
    }
  });
});
server.listen((err) => { if (err) console.log('error ' + err); });
server.on('listening', () => console.log('listening'));
server.on('error', (err) => console.log('error ' + (err && err.message)));
