// Drives ssh2-sftp-client (on Node.js's ssh2) for tests/test_e2e_engines.py, as VS Code's SFTP
// extensions use it. Reads one JSON object on stdin:
//   {"host", "port", "username", "password" (or "privateKey": a key file), "fingerprint": "SHA256:...",
//    "ops": [[name, ...args]]}
// runs the operations in order, and prints one JSON line per operation:
//   {"ok": true, "result": ...} or {"ok": false, "error": "..."}; it stops at the first error.
// The login itself prints {"login": true} or {"login": false, "error": ...} first.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const SftpClient = require("ssh2-sftp-client");

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function raw(client, method, ...args) {
  // ssh2's own SFTP object, for what ssh2-sftp-client does not wrap (links, times).
  return new Promise((resolve, reject) => {
    client.sftp[method](...args, (err, value) => (err ? reject(err) : resolve(value)));
  });
}

const ops = {
  list: async (c, path) =>
    (await c.list(path)).map((e) => ({
      name: e.name, type: e.type, size: e.size, modifyTime: e.modifyTime, rights: e.rights,
    })),
  stat: async (c, path) => {
    const s = await c.stat(path);
    return { mode: s.mode, size: s.size, modifyTime: s.modifyTime, isSymbolicLink: s.isSymbolicLink };
  },
  // put with a path streams the file through ssh2's write stream, one request at a time.
  put: async (c, local, remote) => { await c.put(local, remote); return null; },
  fastPut: async (c, local, remote) => { await c.fastPut(local, remote); return null; },
  get: async (c, remote, local) => { await c.get(remote, local); return null; },
  fastGet: async (c, remote, local) => { await c.fastGet(remote, local); return null; },
  // Resume as the extensions do: open the remote file for writing at an offset, or read from one.
  resumePut: async (c, local, remote, offset) => {
    await c.put(fs.createReadStream(local, { start: offset }), remote,
      { writeStreamOptions: { flags: "r+", start: offset } });
    return null;
  },
  resumeGet: async (c, remote, local, offset) => {
    await c.get(remote, fs.createWriteStream(local, { flags: "r+", start: offset }),
      { readStreamOptions: { start: offset } });
    return null;
  },
  mkdir: async (c, path) => { await c.mkdir(path); return null; },
  rename: async (c, from, to) => { await c.rename(from, to); return null; },
  delete: async (c, path) => { await c.delete(path); return null; },
  rmdir: async (c, path) => { await c.rmdir(path); return null; },
  chmod: async (c, path, mode) => { await c.chmod(path, mode); return null; },
  utimes: async (c, path, atime, mtime) => { await raw(c, "utimes", path, atime, mtime); return null; },
  // ssh2's symlink(targetPath, linkPath): what to point at, then the link to make.
  symlink: async (c, target, link) => { await raw(c, "symlink", target, link); return null; },
  readlink: async (c, path) => raw(c, "readlink", path),
  realpath: async (c, path) => c.realPath(path),
  exists: async (c, path) => c.exists(path),
  // Seconds that another operation took, for measurements (bench/).
  timed: async (c, name, ...args) => {
    const started = process.hrtime.bigint();
    await ops[name](c, ...args);
    return Number(process.hrtime.bigint() - started) / 1e9;
  },
};

async function main() {
  const request = JSON.parse(fs.readFileSync(0, "utf8"));
  const client = new SftpClient();
  try {
    await client.connect({
      host: request.host,
      port: request.port,
      username: request.username,
      password: request.password,
      privateKey: request.privateKey ? fs.readFileSync(request.privateKey) : undefined,
      readyTimeout: 30000,
      hostVerifier: (key) =>
        "SHA256:" + crypto.createHash("sha256").update(key).digest("base64").replace(/=+$/, "") ===
        request.fingerprint,
    });
  } catch (err) {
    out({ login: false, error: String(err && err.message) });
    return;
  }
  out({ login: true });
  try {
    for (const [name, ...args] of request.ops) {
      try {
        out({ ok: true, result: await ops[name](client, ...args) });
      } catch (err) {
        out({ ok: false, error: String(err && err.message) });
        break;
      }
    }
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  out({ ok: false, error: String(err && err.stack) });
  process.exitCode = 1;
});
