// Microsoft's hyco-ws client, unmodified, as a listener or a sender for
// relayd's interop tests (tests/interop/test_hyco.py).
//
//   node ws_peer.js listen NS PATH RULE KEY
//       prints "listening" once its control channel is up, then echoes every
//       message of every sender it accepts ("accepted PROTOCOL" for each).
//   node ws_peer.js send NS PATH RULE KEY COUNT SIZE [SUBPROTOCOL]
//       connects, sends COUNT binary messages of SIZE bytes and one text,
//       checks the echoes, prints "ok SHA256" of all it got back, exits 0;
//       on a refusal prints "refused STATUS" and exits 3.
'use strict';
const crypto = require('crypto');
const WebSocket = require('hyco-ws');

const [mode, ns, path, rule, key, count, size, subprotocol] = process.argv.slice(2);

if (mode === 'listen') {
  const server = WebSocket.createRelayedServer({
    server: WebSocket.createRelayListenUri(ns, path),
    token: () => WebSocket.createRelayToken('http://' + ns, rule, key),
    perMessageDeflate: false,
  }, (ws) => {
    // 'connection' comes as the rendezvous opens; its protocol once it is open
    ws.on('open', () => console.log('accepted ' + (ws.protocol || '-')));
    ws.on('message', (data) => ws.send(data));
  });
  server.on('listening', () => console.log('listening'));
  server.on('error', (err) => console.log('error ' + (err && err.message)));
} else if (mode === 'send') {
  const uri = WebSocket.createRelaySendUri(ns, path);
  // HYCO_TOKEN_TTL: the token's lifetime in seconds (negative: expired)
  const token = WebSocket.createRelayToken(uri, rule, key, Number(process.env.HYCO_TOKEN_TTL || 3600));
  const ws = new WebSocket(uri, subprotocol ? [subprotocol] : null,
                           { headers: { ServiceBusAuthorization: token }, perMessageDeflate: false });
  const hash = crypto.createHash('sha256');
  let left = Number(count) + 1;
  ws.on('unexpected-response', (req, res) => { console.log('refused ' + res.statusCode); process.exit(3); });
  ws.on('error', (err) => { console.log('error ' + err.message); process.exit(4); });
  ws.on('open', () => {
    if (subprotocol && ws.protocol !== subprotocol) { console.log('wrong protocol ' + ws.protocol); process.exit(5); }
    for (let i = 0; i < Number(count); i++) {
      ws.send(crypto.createHash('sha256').update(String(i)).digest().toString('hex').repeat(Math.ceil(Number(size) / 64))
                .slice(0, Number(size)), { binary: true });
    }
    ws.send('the end');
  });
  ws.on('message', (data) => {
    hash.update(data);
    if (--left === 0) { console.log('ok ' + hash.digest('hex')); ws.close(); }
  });
  ws.on('close', () => process.exit(left === 0 ? 0 : 6));
}
