// A real OpenID Connect provider on loopback for relayd's sign-in tests:
// panva's oidc-provider (pinned in package.json), unmodified, with the
// interaction pages written here: a login form that checks a password, and
// the consent form the provider asks of native clients at every sign-in.
//
//   node provider.mjs PORT [--issuer URL] [--tenant PORT2]
//
// PORT: where the provider listens (127.0.0.1). --issuer: its issuer when
// it is reached through something else (the tests' network attacker sits in
// front of it), default http://127.0.0.1:PORT. --tenant: a second provider
// (its own issuer, http://127.0.0.1:PORT2) with the same clients, accounts
// and signing keys, as the tenants of one multi-tenant IdP share keys: only
// the iss claim tells their ID tokens apart.
//
// Signing keys (RSA for RS256, the default ID token algorithm, and Ed25519)
// and the cookie key are made at start. When both providers listen, one line
// of JSON goes to stdout: the issuers, the clients and the accounts.

import { generateKeyPairSync, randomBytes, createHash, timingSafeEqual } from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const args = process.argv.slice(2);
const port = Number(args[0]);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  process.stderr.write('usage: node provider.mjs PORT [--issuer URL] [--tenant PORT2]\n');
  process.exit(2);
}
const opt = (name) => {
  const i = args.indexOf(name);
  return i > 0 ? args[i + 1] : undefined;
};
const issuer = opt('--issuer') ?? `http://127.0.0.1:${port}`;
const tenantPort = opt('--tenant') ? Number(opt('--tenant')) : undefined;

// relayd's controller holds the secret (a confidential client) while the
// browser comes back to the user's loopback listener on a port of its own
// choice: a native client, whose loopback redirects match on any port
// (RFC 8252 section 7.3). The secret has characters that the client must
// form-encode in HTTP Basic (RFC 6749 section 2.3.1). "portal" is another
// application of the same IdP.
const clients = [
  { client_id: 'relayd', client_secret: 'relayd s3cret/+:%', application_type: 'native' },
  { client_id: 'portal', client_secret: 'portal-secret', application_type: 'native' },
].map((c) => ({
  ...c,
  redirect_uris: ['http://127.0.0.1/callback'],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
}));

const accounts = {
  'u-1001': { username: 'alice', password: 'alice pass 1', email: 'alice@example.com', groups: ['engineering'] },
  'u-1002': { username: 'bob', password: 'bob pass 22', email: 'bob@example.com', groups: ['sales'] },
};

const digest = (s) => createHash('sha256').update(String(s)).digest();

function checkPassword(username, password) {
  let found;
  for (const [sub, a] of Object.entries(accounts)) {
    if (a.username === username) found = sub;
  }
  const want = found ? accounts[found].password : randomBytes(16).toString('hex');
  return timingSafeEqual(digest(want), digest(password)) && found ? found : undefined;
}

function keys() {
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ed = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
  return [
    { ...rsa, kid: `rsa-${randomBytes(4).toString('hex')}`, use: 'sig', alg: 'RS256' },
    { ...ed, kid: `ed-${randomBytes(4).toString('hex')}`, use: 'sig', alg: 'EdDSA' },
  ];
}

const jwks = { keys: keys() };
const cookieKeys = [randomBytes(32).toString('hex')];

function configuration() {
  return {
    clients,
    jwks,
    cookies: { keys: cookieKeys },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['preferred_username', 'name'],
      groups: ['groups'],
    },
    async findAccount(ctx, sub) {
      const a = accounts[sub];
      if (!a) return undefined;
      return {
        accountId: sub,
        async claims() {
          return {
            sub, email: a.email, email_verified: true, preferred_username: a.username, name: a.username, groups: a.groups,
          };
        },
      };
    },
    pkce: { required: () => true },
    features: { devInteractions: { enabled: false } },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    renderError(ctx, out) {
      ctx.type = 'text/plain';
      ctx.body = `error: ${out.error}: ${out.error_description ?? ''}\n`;
    },
  };
}

const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, status, title, note, action, fields) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(`<!DOCTYPE html><title>${escape(title)}</title><p>${escape(note)}</p>
<form method="post" action="${escape(action)}">${fields}<button type="submit">${escape(title)}</button></form>\n`);
}

const loginForm = (res, uid, status, note) => page(res, status, 'Sign in', note, `/interaction/${uid}/login`,
  '<input name="username" autocomplete="username"><input name="password" type="password">');

async function body(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 65536) throw new Error('form too large');
    chunks.push(c);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

// The provider's own pages are its routes; /interaction/* are this
// script's: the login form and its check, the consent form.
function serve(provider) {
  const callback = provider.callback();
  return http.createServer(async (req, res) => {
    const m = /^\/interaction\/([\w-]+)(\/login|\/confirm)?$/.exec(req.url.split('?')[0]);
    if (!m) {
      callback(req, res);
      return;
    }
    try {
      const details = await provider.interactionDetails(req, res);
      const { uid, prompt, params } = details;
      if (req.method === 'GET' && !m[2]) {
        if (prompt.name === 'login') {
          loginForm(res, uid, 200, `Sign in to ${params.client_id}`);
        } else {
          page(res, 200, 'Allow', `Allow ${params.client_id} to know ${params.scope}?`, `/interaction/${uid}/confirm`, '');
        }
        return;
      }
      if (req.method !== 'POST' || m[2] !== (prompt.name === 'login' ? '/login' : '/confirm')) {
        res.statusCode = 400;
        res.end();
        return;
      }
      if (prompt.name === 'login') {
        const f = await body(req);
        const sub = checkPassword(f.get('username'), f.get('password'));
        if (!sub) {
          loginForm(res, uid, 401, 'Wrong username or password');
          return;
        }
        await provider.interactionFinished(req, res, { login: { accountId: sub } }, { mergeWithLastSubmission: false });
        return;
      }
      const grant = details.grantId ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
      grant.addOIDCScope(String(params.scope));
      const grantId = await grant.save();
      await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    } catch (err) {
      res.statusCode = 400;
      res.setHeader('Content-Type', 'text/plain');
      res.end(`error: ${err.message}\n`);
    }
  });
}

function listen(server, p) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(p, '127.0.0.1', resolve);
  });
}

function start(iss, p) {
  const provider = new Provider(iss, configuration());
  provider.on('server_error', (ctx, err) => process.stderr.write(`provider ${iss}: ${err.stack}\n`));
  return listen(serve(provider), p);
}

await start(issuer, port);
const tenant = tenantPort ? `http://127.0.0.1:${tenantPort}` : undefined;
if (tenant) await start(tenant, tenantPort);

process.stdout.write(`${JSON.stringify({
  ready: true,
  issuer,
  tenant,
  clients: clients.map(({ client_id, client_secret }) => ({ client_id, client_secret })),
  accounts: Object.values(accounts).map(({ username, password, email, groups }) => ({ username, password, email, groups })),
})}\n`);

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
