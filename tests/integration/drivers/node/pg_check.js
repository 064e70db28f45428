#!/usr/bin/env node
// node-postgres (`pg`) check script for the egressproxy driver matrix.
//
// It connects with node-postgres to --addr:--port (normally one of the
// proxy's listeners in front of a real PostgreSQL that wants SCRAM over TLS)
// and runs a fixed checklist. The contract, shared with every driver script
// (see ../README.md):
//
//   node pg_check.js --addr IP --port N --host NAME --tls verify-full|disable
//                    --ca PATH --dbname D --user U --password P [--checks a,b]
//
//   --tls verify-full: TLS from the driver; the chain is checked against --ca,
//     the certificate's name against --host, and SNI is --host, while the TCP
//     socket goes to --addr.  --tls disable: plaintext to the proxy (which
//     originates TLS upstream); --ca is then ignored.
//   Output: one JSON object per line on stdout, one per check, in the order
//     of CHECKS below: {"check", "ok", "detail", "seconds"}.  Nothing else
//     goes to stdout; diagnostics go to stderr.
//   Exit code: 0 iff every check was ok, 1 otherwise, 2 for bad arguments.
//   Each check catches its own errors and is cut off after CHECK_TIMEOUT_MS;
//   once RUN_BUDGET_MS has gone by, the checks left fail without running.

'use strict'

const crypto = require('crypto')
const fs = require('fs')
const tls = require('tls')
const { parseArgs } = require('util')
const { Readable } = require('stream')
const { pipeline } = require('stream/promises')

const pg = require('pg')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const PG_VERSION = require('pg/package.json').version

const CHECK_TIMEOUT_MS = 20000
const RUN_BUDGET_MS = 45000
const CONNECT_TIMEOUT_MS = 5000
const CLOSE_TIMEOUT_MS = 2000
const NOTIFY_WAIT_MS = 5000
const CANCEL_AFTER_MS = 500
const CANCEL_WAIT_MS = 5000
const COPY_ROWS = 20000

// ---------------------------------------------------------------------------
// Arguments

const REQUIRED = ['addr', 'port', 'host', 'tls', 'ca', 'dbname', 'user', 'password']

class UsageError extends Error {}

function parseOptions(argv) {
  const spec = {}
  for (const name of [...REQUIRED, 'checks']) spec[name] = { type: 'string' }
  let values
  try {
    values = parseArgs({ args: argv, options: spec, strict: true }).values
  } catch (err) {
    throw new UsageError(err.message)
  }
  const missing = REQUIRED.filter((name) => values[name] === undefined)
  if (missing.length) throw new UsageError(`missing --${missing.join(', --')}`)
  if (!['verify-full', 'disable'].includes(values.tls)) {
    throw new UsageError(`--tls must be verify-full or disable, not ${values.tls}`)
  }
  const port = Number(values.port)
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new UsageError(`--port must be a TCP port, not ${values.port}`)
  }
  return { ...values, port, checks: selectChecks(values.checks) }
}

// The checks to run, always in the contract's order.
function selectChecks(list) {
  const all = Object.keys(CHECKS)
  if (list === undefined || list === '') return all
  const wanted = list.split(',').map((name) => name.trim()).filter(Boolean)
  const unknown = wanted.filter((name) => !all.includes(name))
  if (unknown.length) throw new UsageError(`unknown check(s): ${unknown.join(', ')}`)
  return all.filter((name) => wanted.includes(name))
}

// ---------------------------------------------------------------------------
// Connections

// node-postgres's `ssl` option for the contract's --tls modes.  `host` in the
// client config is the IP the socket goes to; `servername` makes SNI the
// database's name, and checkServerIdentity checks the certificate against it.
function sslOptions(opts) {
  if (opts.tls === 'disable') return false
  return {
    ca: fs.readFileSync(opts.ca),
    servername: opts.host,
    rejectUnauthorized: true,
    checkServerIdentity: (_, cert) => tls.checkServerIdentity(opts.host, cert),
  }
}

function clientConfig(opts, overrides = {}) {
  return {
    host: opts.addr,
    port: opts.port,
    database: opts.dbname,
    user: opts.user,
    password: opts.password,
    ssl: sslOptions(opts),
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    application_name: 'egressproxy-driver-check-node',
    ...overrides,
  }
}

// Every client a check opens goes through a Scope, which closes them all when
// the check ends, whether it passed, failed or timed out.
class Scope {
  constructor(opts) {
    this.opts = opts
    this.clients = []
  }

  async connect(overrides = {}) {
    const client = new pg.Client(clientConfig(this.opts, overrides))
    // An error on an idle client is emitted, and would kill the process
    // if nobody listened.
    client.on('error', (err) => log(`client error: ${err.message}`))
    this.clients.push(client)
    await client.connect()
    return client
  }

  async close() {
    await Promise.all(this.clients.map(closeClient))
  }
}

async function closeClient(client) {
  try {
    await withTimeout(client.end(), CLOSE_TIMEOUT_MS, 'closing the connection')
  } catch (err) {
    log(`close: ${err.message}`)
  } finally {
    client.connection.stream.destroy()
  }
}

async function queryOne(client, text, values) {
  const result = await client.query(text, values)
  return result.rows[0]
}

// ---------------------------------------------------------------------------
// The checks: each takes (scope, opts) and returns its detail text, or
// throws to fail.

async function checkConnect(scope, opts) {
  const client = await scope.connect()
  const one = await queryOne(client, 'select 1 as one')
  if (one.one !== 1) throw new Error(`select 1 returned ${JSON.stringify(one.one)}`)
  const ssl = await queryOne(
    client,
    'select ssl, version from pg_stat_ssl where pid = pg_backend_pid()'
  )
  const side = opts.tls === 'disable'
    ? 'plaintext to the proxy'
    : `driver TLS ${client.connection.stream.getProtocol()} (SNI ${opts.host}, verify-full)`
  const detail = `pg ${PG_VERSION}: select 1 ok; ${side}; server pg_stat_ssl.ssl=${ssl && ssl.ssl}` +
    (ssl && ssl.ssl ? ` (${ssl.version})` : '')
  if (!ssl || ssl.ssl !== true) throw new Error(detail)
  return detail
}

async function checkSimpleQuery(scope) {
  const client = await scope.connect()
  // A plain string and no values: node-postgres sends a simple Query message.
  const row = await queryOne(client, 'select 40 + 2 as answer')
  expectEqual(row.answer, 42, 'select 40 + 2')
  return 'simple protocol: select 40 + 2 = 42'
}

async function checkExtendedQuery(scope) {
  const client = await scope.connect()
  // Values make node-postgres use Parse/Bind/Execute with an unnamed statement.
  const row = await queryOne(client, 'select $1::int + $2::int as answer', [40, 2])
  expectEqual(row.answer, 42, 'select $1::int + $2::int')
  return 'extended protocol: select $1::int + $2::int with [40, 2] = 42'
}

async function checkPrepared(scope) {
  const client = await scope.connect()
  const name = `egress_check_${randomHex(4)}`
  const text = 'select $1::int * $2::int as product'
  const cases = [[6, 7], [3, 14], [-5, 9], [1000, 1000]]
  for (const [a, b] of cases) {
    const result = await client.query({ name, text, values: [a, b] })
    expectEqual(result.rows[0].product, a * b, `${name}(${a}, ${b})`)
  }
  const row = await queryOne(
    client,
    'select from_sql, parameter_types::text as types from pg_prepared_statements where name = $1',
    [name]
  )
  if (!row) throw new Error(`${name} is not in pg_prepared_statements`)
  return `named statement ${name} executed ${cases.length} times, results right; ` +
    `pg_prepared_statements: from_sql=${row.from_sql}, parameter_types=${row.types}`
}

async function checkCopy(scope) {
  const client = await scope.connect()
  await client.query('create temp table egress_copy_check (id int, payload text)')
  const sent = copyRows(COPY_ROWS)
  const sentHash = sha256(sent)

  const copyIn = client.query(copyFrom('copy egress_copy_check (id, payload) from stdin'))
  await pipeline(Readable.from(chunks(sent, 64 * 1024)), copyIn)
  const copied = copyIn.rowCount

  const hash = crypto.createHash('sha256')
  let received = 0
  const copyOut = client.query(
    copyTo('copy (select id, payload from egress_copy_check order by id) to stdout')
  )
  for await (const chunk of copyOut) {
    hash.update(chunk)
    received += chunk.length
  }
  const receivedHash = hash.digest('hex')

  const detail = `${copied} rows in, ${sent.length} bytes sent sha256 ${sentHash.slice(0, 16)}, ` +
    `${received} bytes received sha256 ${receivedHash.slice(0, 16)}`
  if (copied !== COPY_ROWS || receivedHash !== sentHash) throw new Error(`mismatch: ${detail}`)
  return `match: ${detail}`
}

async function checkListenNotify(scope) {
  const listener = await scope.connect()
  const notifier = await scope.connect()
  const channel = `egress_chan_${randomHex(6)}`
  const payload = `payload-${randomHex(6)}`

  await listener.query(`listen ${channel}`)
  const arrived = new Promise((resolve) => {
    listener.on('notification', (msg) => {
      if (msg.channel === channel && msg.payload === payload) resolve(msg)
    })
  })
  const started = Date.now()
  await notifier.query(`notify ${channel}, '${payload}'`)
  const msg = await withTimeout(arrived, NOTIFY_WAIT_MS, `waiting for the notification on ${channel}`)
  const seconds = (Date.now() - started) / 1000
  if (msg.processId !== notifier.processID) {
    throw new Error(`notification came from pid ${msg.processId}, not the notifier's ${notifier.processID}`)
  }
  return `received ${payload} on ${channel} from pid ${msg.processId} after ${seconds.toFixed(3)} s`
}

// node-postgres has Client#cancel(client, query): called on a second, unconnected
// Client, it opens a new socket to that client's host and port and sends a
// CancelRequest with the target's processID and secretKey, in plaintext, as
// libpq does.  The canceller gets ssl: false so that it sends nothing else.
async function checkCancel(scope, opts) {
  const client = await scope.connect()
  const query = new pg.Query('select pg_sleep(30)')
  const outcome = new Promise((resolve) => {
    query.on('error', (err) => resolve({ err }))
    query.on('end', () => resolve({ err: null }))
  })
  client.query(query)
  await sleep(CANCEL_AFTER_MS)

  const canceller = new pg.Client({ host: opts.addr, port: opts.port, ssl: false })
  canceller.connection.on('error', (err) => log(`cancel socket: ${err.message}`))
  const sentAt = Date.now()
  try {
    canceller.cancel(client, query)
    const { err } = await withTimeout(outcome, CANCEL_WAIT_MS,
      `waiting for pg_sleep(30) to fail after the CancelRequest for pid ${client.processID}`)
    const seconds = (Date.now() - sentAt) / 1000
    if (!err) throw new Error('pg_sleep(30) finished without being canceled')
    if (err.code !== '57014') throw new Error(`query failed with ${err.code}: ${err.message}`)
    const after = await queryOne(client, 'select 1 as one')
    expectEqual(after.one, 1, 'select 1 after the cancel')
    return `pg Client#cancel sent a plaintext CancelRequest (pid ${client.processID}) to ` +
      `${opts.addr}:${opts.port} after ${CANCEL_AFTER_MS / 1000} s; query failed with 57014 ` +
      `"${err.message}" ${seconds.toFixed(3)} s later; connection still usable`
  } finally {
    canceller.connection.stream.destroy()
  }
}

async function checkWrongPassword(scope, opts) {
  try {
    await scope.connect({ password: opts.password + '-wrong' })
  } catch (err) {
    const good = err.code === '28P01' && /password authentication failed/.test(err.message)
    if (!good) throw new Error(`expected 28P01, got ${errorText(err)}`)
    return err.message
  }
  throw new Error('connected with a wrong password')
}

const CHECKS = {
  connect: checkConnect,
  simple_query: checkSimpleQuery,
  extended_query: checkExtendedQuery,
  prepared: checkPrepared,
  copy: checkCopy,
  listen_notify: checkListenNotify,
  cancel: checkCancel,
  wrong_password: checkWrongPassword,
}

// ---------------------------------------------------------------------------
// COPY data: deterministic rows in COPY's text format, with non-ASCII text,
// tabs, newlines and backslashes escaped as the server itself writes them,
// so that COPY TO gives back exactly the same bytes.

function copyRows(count) {
  const lines = []
  for (let id = 1; id <= count; id++) {
    const payload = `row ${id}\tcafé ß 日本語 🐘\\ \n` + 'x'.repeat(id % 17)
    lines.push(`${id}\t${escapeCopyText(payload)}\n`)
  }
  return Buffer.from(lines.join(''), 'utf8')
}

function escapeCopyText(text) {
  return text
    .replace(/\\/g, '\\\\')
    .replace(/\t/g, '\\t')
    .replace(/\n/g, '\\n')
    .replace(/\r/g, '\\r')
}

function* chunks(buffer, size) {
  for (let at = 0; at < buffer.length; at += size) yield buffer.subarray(at, at + size)
}

// ---------------------------------------------------------------------------
// Small helpers

function log(text) {
  process.stderr.write(`pg_check: ${text}\n`)
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

function randomHex(bytes) {
  return crypto.randomBytes(bytes).toString('hex')
}

function sha256(buffer) {
  return crypto.createHash('sha256').update(buffer).digest('hex')
}

function expectEqual(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`)
  }
}

// Resolve or reject as `promise` does, or reject after `ms` milliseconds.
function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms / 1000} s ${what}`)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}

function errorText(err) {
  if (!(err instanceof Error)) return String(err)
  const code = err.code ? `${err.code}: ` : ''
  return `${code}${err.message}`
}

// ---------------------------------------------------------------------------
// Running

async function runCheck(name, opts, deadline) {
  const scope = new Scope(opts)
  const started = process.hrtime.bigint()
  const limit = Math.min(CHECK_TIMEOUT_MS, deadline - Date.now())
  let ok = true
  let detail
  try {
    if (limit <= 0) throw new Error(`not run: the script's ${RUN_BUDGET_MS / 1000} s budget is used up`)
    detail = await withTimeout(CHECKS[name](scope, opts), limit, `in check ${name}`)
  } catch (err) {
    ok = false
    detail = errorText(err)
    log(`${name} failed: ${err && err.stack ? err.stack : err}`)
  }
  await scope.close()
  const seconds = Number(process.hrtime.bigint() - started) / 1e9
  return { name, ok, detail: String(detail), seconds }
}

// One output line. Written by hand so that "seconds" always has a decimal
// point (JSON.stringify writes 5, not 5.0, which a reader could take for an int).
function resultLine({ name, ok, detail, seconds }) {
  return `{"check": ${JSON.stringify(name)}, "ok": ${ok}, "detail": ${JSON.stringify(detail)}, ` +
    `"seconds": ${seconds.toFixed(3)}}`
}

async function main() {
  let opts
  try {
    opts = parseOptions(process.argv.slice(2))
  } catch (err) {
    if (!(err instanceof UsageError)) throw err
    log(`usage error: ${err.message}`)
    return 2
  }
  const deadline = Date.now() + RUN_BUDGET_MS
  let allOk = true
  for (const name of opts.checks) {
    const result = await runCheck(name, opts, deadline)
    allOk = allOk && result.ok
    process.stdout.write(resultLine(result) + '\n')
  }
  return allOk ? 0 : 1
}

// A rejection nobody awaited (e.g. from a query abandoned by a timed-out
// check) must not end the run.
process.on('unhandledRejection', (err) => log(`unhandled rejection: ${errorText(err)}`))

main().then(
  (code) => process.stdout.write('', () => process.exit(code)),
  (err) => {
    log(`internal error: ${err && err.stack ? err.stack : err}`)
    process.stdout.write('', () => process.exit(1))
  }
)
