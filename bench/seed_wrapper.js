'use strict';
// A minimal seed-like Node wrapper (bench only): the per-call work go-faas did.
//
//   node seed_wrapper.js [--ts ESBUILD]
//
// Reads one JSON request {"code": <function body>, "input": <JSON text>} from stdin,
// runs the body as an async function of (event, input) and prints the result as one JSON
// line. With --ts the body is TypeScript and is transpiled on this call by spawning the
// esbuild binary inside the same sandbox (the seed transpiled every call through tsx,
// which is much slower: ~465 ms). Written for the benchmark; not the seed's code.
const fs = require('fs');
const { execFileSync } = require('child_process');

async function main() {
  const request = JSON.parse(fs.readFileSync(0, 'utf8'));
  const event = JSON.parse(request.input || '{}');
  let source = 'async function __main(event, input) {' + request.code + '\n}';
  const ts = process.argv.indexOf('--ts');
  if (ts >= 0) {
    source = execFileSync(process.argv[ts + 1], ['--loader=ts', '--log-level=error'],
                          { input: source, encoding: 'utf8' });
  }
  const main = new Function(source + '\nreturn __main;')();
  const result = await main(event, event);
  if (result !== undefined) process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch((error) => { process.stderr.write(String(error && error.stack || error) + '\n'); process.exit(1); });
