'use strict';
/**
 * Run one faas JavaScript/TypeScript function: the wrapper program started in the sandbox.
 *
 *     /usr/bin/node node.js [--check] [--cold] [RESULT_FD]
 *
 * Protocol (see DESIGN.md, "Wrapper protocol"):
 * - stdin carries one JSON request {"code", "event", "language"} and, for a function with
 *   secrets, "env" ({name: value}, set in process.env before the code runs); it is read
 *   to EOF only after every require, so a pool can pre-start this process.
 * - javascript: `code` is a function body; it becomes
 *   `async function __main(event, input) {` + code + `\n}` with the header on the user's
 *   first line, so line numbers match and top-level `return`/`await` work.
 * - typescript: `code` is esbuild's output for that same wrapping (done by the server at
 *   upload), a plain `async function __main` declaration with an inline source map.
 * - Exactly one JSON document goes to RESULT_FD (default 3), never to stdout:
 *   {"ok": true, "value": v} ("value" absent for undefined) or
 *   {"ok": false, "error": {"type", "message", "stack", "line"}}; then the process exits
 *   at once, without waiting for timers the function left behind.
 * - --check only compiles the wrapped source and writes {"ok": true} or the error.
 * - "layer" in the request (a version with libraries): /tmp/node_modules becomes a link to
 *   its node_modules, so require() and import() find them. --layer=DIR --preload=a,b (a
 *   warm sandbox of the pool): that is done, and the packages required, before the request.
 * - --cold: the request is already waiting (no pool started this process ahead of the
 *   call), so nothing is prepared ahead that the call may not need.
 *
 * - TypeScript stacks show the .ts lines through esbuild's inline source map, read only
 *   when a stack is formatted (see deferSourceMap); Node runs without
 *   --enable-source-maps, which would parse every map at compile time.
 *
 * A CommonJS module rather than a vm.Script gives the code its own `require`, `module`,
 * `__filename` and `__dirname`. The module is compiled from memory (Module#_compile),
 * nothing is written to disk.
 */
const fs = require('fs');
const path = require('path');
const util = require('util');
const vm = require('vm');
const Module = require('module');

const NAME = 'function.js';
// The path must be absolute: Node resolves the source map (and so the .ts name) from it.
const FILE = path.join(process.cwd(), NAME);
const PREFIX = FILE.slice(0, -NAME.length); // stripped from stacks: "function.js:3:7"
const CJS_PARAMS = ['exports', 'require', 'module', '__filename', '__dirname'];

// Headers put in front of the user's first line: by wrap() for JavaScript, by the server
// (before esbuild) for TypeScript. Columns on line 1 are shifted back by their length.
const HEADERS = {
  js: 'module.exports = async function __main(event, input) {',
  ts: 'async function __main(event: any, input: any) {',
};

/** The module source that exports the user's function. */
function wrap(req) {
  if (req.language === 'typescript') {
    return deferSourceMap(req.code) + '\nmodule.exports = __main;\n';
  }
  return HEADERS.js + req.code + '\n};\n';
}

const MAP_MARK = '\n//# sourceMappingURL=data:application/json;base64,';
const FILE_POSITION = new RegExp(FILE.replace(/[.*+?^${}()|[\]\\]/g, '\\$&') + ':(\\d+):(\\d+)', 'g');

/** TypeScript only: [line, column] in the .ts source of a 1-based position in FILE, or
 * null; set by deferSourceMap. */
let originalPosition = null;

/** Cut esbuild's inline source map off the code and map this file's stack frames
 * through it when a stack is formatted. Left in the code, the map would be decoded and
 * parsed on every call (~0.5 ms, a fifth of a pooled call) to serve only failing ones. */
function deferSourceMap(code) {
  const at = code.lastIndexOf(MAP_MARK);
  if (at < 0) return code;
  const payload = code.slice(at + MAP_MARK.length).trim();
  let map = null;
  originalPosition = (line, column) => {
    try {
      map = map || new Module.SourceMap(JSON.parse(Buffer.from(payload, 'base64').toString()));
      const entry = map.findEntry(line - 1, column - 1);
      return entry.originalLine === undefined ? null : [entry.originalLine + 1, entry.originalColumn + 1];
    } catch (e) { // an unreadable map leaves the JavaScript position
      return null;
    }
  };
  const frame = (site) => {
    const text = String(site);
    const line = site.getLineNumber();
    const column = site.getColumnNumber();
    const mapped = site.getFileName() === FILE && originalPosition(line, column);
    return mapped ? text.replace(`${FILE}:${line}:${column}`, `${PREFIX}function.ts:${mapped.join(':')}`) : text;
  };
  // V8's own format: the error's toString(), then one "    at" line per frame.
  Error.prepareStackTrace = (error, sites) => {
    let head;
    try {
      head = Error.prototype.toString.call(error);
    } catch (e) {
      head = '<error>';
    }
    return head + sites.map((site) => '\n    at ' + frame(site)).join('');
  };
  return code.slice(0, at);
}

/** Make a stack read as if the user's code were a file of its own: no directory in our
 * file names, no header in line 1 positions, and no wrapper frames (nor the Node
 * internals that called into the user's code). */
function cleanStack(stack) {
  if (originalPosition) { // positions left unmapped: the user's code replaced or removed the hook
    stack = stack.replace(FILE_POSITION, (position, line, column) => {
      const mapped = originalPosition(Number(line), Number(column));
      return mapped ? `${PREFIX}function.ts:${mapped.join(':')}` : position;
    });
  }
  const lines = stack.split(PREFIX + 'function.').join('function.').split('\n')
    .map((l) => l.replace(/([\s(]|^)function\.([jt]s):1:(\d+)/,
      (m, pre, ext, col) => `${pre}function.${ext}:1:${Math.max(1, col - HEADERS[ext].length)}`));
  // A syntax error starts "function.js:1", the source line, then a caret line.
  if (lines[0] === 'function.js:1' && lines.length > 2 && lines[1].startsWith(HEADERS.js)) {
    lines[1] = lines[1].slice(HEADERS.js.length);
    lines[2] = lines[2].slice(HEADERS.js.length);
  }
  let end = lines.findIndex((l) => l.includes(__filename));
  if (end < 0) end = lines.length;
  while (end > 0 && /^\s+at .*node:/.test(lines[end - 1])) end--;
  return lines.slice(0, end).join('\n');
}

/** The user's line number in a cleaned stack: a frame "function.js:3:7" (or
 * "function.ts:…" after source mapping), or a syntax error's "function.js:3" header. */
function userLine(stack) {
  const m = /(?:^|[\s(])function\.[jt]s:(\d+)/m.exec(stack);
  return m ? Number(m[1]) : null;
}

function errorResult(err) {
  let type = 'Error';
  let message;
  let stack = '';
  try {
    if (util.types.isNativeError(err) || err instanceof Error) {
      type = String(err.name || 'Error');
      message = String(err.message);
      stack = cleanStack(String(err.stack));
    } else {
      // `throw "text"` or `Promise.reject({...})`: no stack to show.
      message = typeof err === 'string' ? err : util.inspect(err, { depth: 2, breakLength: Infinity });
    }
  } catch (e) { // a hostile getter or Proxy must not lose the answer
    message = 'unprintable thrown value';
  }
  const line = userLine(stack);
  const lastLine = req.code.split('\n').length;
  if (type === 'SyntaxError' && req.language !== 'typescript' && line > lastLine) {
    // Unfinished code (`return 1 +`, an open brace) fails on our closing `}`: report it
    // at the end of the user's code instead.
    message = 'Unexpected end of input';
    return { ok: false, error: { type, message, stack: `function.js:${lastLine}\n\nSyntaxError: ${message}`, line: lastLine } };
  }
  return { ok: false, error: { type, message, stack, line } };
}

/** Always-valid JSON for a result document. BigInt becomes a string, NaN/Infinity null
 * (JSON.stringify's rule), a function or symbol its String(); a cycle is an error. */
function dump(result) {
  try {
    if (!result.ok || result.value === undefined) return JSON.stringify(result);
    const replacer = (key, v) => (typeof v === 'bigint' ? v.toString() : v);
    let json = JSON.stringify(result.value, replacer);
    if (json === undefined) json = JSON.stringify(String(result.value));
    return '{"ok":true,"value":' + json + '}';
  } catch (e) {
    return JSON.stringify(errorResult(new TypeError('return value is not JSON-serialisable: ' + e.message)));
  }
}

function writeAll(fd, text) {
  const buf = Buffer.from(text);
  for (let off = 0; off < buf.length;) {
    try {
      off += fs.writeSync(fd, buf, off);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
    }
  }
}

/** The version's libraries: node_modules beside the function file serves both require()
 * and import() (ESM resolution ignores module.paths and NODE_PATH). /tmp is the run's own. */
function linkLayer(layer) {
  fs.symlinkSync(layer + '/node_modules', path.join(path.dirname(FILE), 'node_modules'));
}

/** A warm sandbox (--layer=DIR --preload=a,b): link the layer and require the packages
 * before the request arrives (an ESM-only one fails here and is imported by the call). */
function preload() {
  const layerArg = args.find((a) => a.startsWith('--layer='));
  if (!layerArg) return null;
  const layer = layerArg.slice('--layer='.length);
  linkLayer(layer);
  const load = Module.createRequire(FILE);
  const names = (args.find((a) => a.startsWith('--preload=')) || '--preload=').slice('--preload='.length);
  for (const name of names.split(',').filter(Boolean)) {
    try {
      load(name);
    } catch (e) { /* the function's own require reports it */ }
  }
  return layer;
}

// ---------------------------------------------------------------- main
const args = process.argv.slice(2);
const checkOnly = args.includes('--check');
const fdArg = args.find((a) => !a.startsWith('--'));
const resultFd = fdArg === undefined ? 3 : Number(fdArg);

// Blocking writes: a function that prints in a tight loop then waits for the server to
// read (which enforces the output limit) instead of queueing output in its own memory.
const outputs = []; // the streams opened so far, drained before the result is written
function opened(stream) {
  if (stream._handle && stream._handle.setBlocking) stream._handle.setBlocking(true);
  outputs.push(stream);
  return stream;
}
// process.stdout/stderr are created on first use, which loads the stream machinery
// (~2 ms). A pre-started wrapper creates them while it waits for its request; a cold one
// only if the function prints (console.log reaches them through these getters too).
if (checkOnly || args.includes('--cold')) {
  for (const name of ['stdout', 'stderr']) {
    const create = Object.getOwnPropertyDescriptor(process, name).get;
    let stream = null;
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: true,
      get: () => stream || (stream = opened(create.call(process))),
    });
  }
} else {
  opened(process.stdout);
  opened(process.stderr);
}
const preloadedLayer = preload();
const req = JSON.parse(fs.readFileSync(0, 'utf8')); // blocks until the server sends it
if (req.env) Object.assign(process.env, req.env); // the function's secrets, for its own calls only
const source = wrap(req);

if (checkOnly) {
  let result = { ok: true };
  try {
    vm.compileFunction(source, CJS_PARAMS, { filename: FILE }); // as Module#_compile does
  } catch (e) {
    result = errorResult(e);
  }
  writeAll(resultFd, dump(result));
  fs.closeSync(resultFd);
  process.exit(0);
}

let pending = null; // the result, once the function has settled (or failed)
let written = false;

/** Answer once: the first settlement wins, later errors from leftover work are ignored. */
function settle(result) {
  if (pending) return;
  pending = result;
  // Let stdout/stderr hand everything already printed to the OS before the result
  // is written (pipes are synchronous on Linux, so this is normally immediate).
  Promise.all(outputs.map(drain)).then(() => process.exit(0));
}

function drain(stream) {
  return new Promise((resolve) => {
    if (!stream.writableLength) resolve();
    else stream.write('', () => resolve());
  });
}

// Every way out passes here, including a process.exit() in the user's code.
// process.exit() / process.exit(0) means "done, nothing returned" (the answer then comes
// from what was printed); another code is an error. Once a result is written the
// process exits 0; "no result" then always means a crash (signal, OOM, abort).
process.on('exit', (code) => {
  if (written) return;
  written = true;
  if (!pending) {
    pending = code === 0 ? { ok: true }
      : errorResult(Object.assign(new Error('process.exit(' + code + ') called'), { name: 'ProcessExit', stack: '' }));
  }
  try {
    writeAll(resultFd, dump(pending));
    fs.closeSync(resultFd);
  } catch (e) { /* the server has gone: nothing left to tell */ }
  process.exitCode = 0;
});
process.on('uncaughtException', (err) => settle(errorResult(err)));
process.on('unhandledRejection', (reason) => settle(errorResult(reason)));
// The event loop ran dry while the function's promise was still pending.
process.on('beforeExit', () => settle(errorResult(
  Object.assign(new Error('the function never returned: its promise was never settled'), { stack: '' }))));

process.argv = [process.argv[0], FILE];
if (req.layer && req.layer !== preloadedLayer) linkLayer(req.layer);
const event = req.event === undefined ? null : req.event;
Promise.resolve()
  .then(() => {
    const mod = new Module(FILE, null);
    mod.filename = FILE;
    mod.paths = Module._nodeModulePaths(path.dirname(FILE));
    mod._compile(source, FILE);
    const main = mod.exports;
    if (typeof main !== 'function') throw new TypeError('the code does not define function __main');
    return main(event, event);
  })
  .then((value) => settle({ ok: true, value }), (err) => settle(errorResult(err)));
