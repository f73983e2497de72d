// node-postgres (`pg`) in the driver matrix: unnamed parameterized queries,
// named statements ({name, text, values}), rowMode 'array', a pg.Pool with
// concurrent queries and pooled transactions. Every check runs on the
// reference table and through shardgate; rows, column names, row counts and
// SQLSTATEs must be equal (error messages are shown, never compared).
//
// usage: node pg_matrix.js IDS.tsv REFERENCE_DSN PROXY_DSN
'use strict';

const fs = require('fs');
const pg = require('pg');

const DRIVER = 'node-postgres';
const SEL = 'SELECT id, order_no, merchant_id, order_amount, pay_status, create_time FROM t_order';
const INSERT = 'INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5, $6)';

function loadIds(path) {
  const kinds = {};
  for (const line of fs.readFileSync(path, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const [kind, ids] = line.split('\t');
    kinds[kind] = ids.split(',').map((x) => BigInt(x));
  }
  return kinds;
}

// same layout as drivers.rs: ms 2026-08-15 since 2024-01-01, worker 3
function snowflakeShaped(shard, seq) {
  return (82684800000n << 22n) | (3n << 16n) | (BigInt(shard & 7) << 12n) | BigInt(seq & 0xfff);
}

function norm(v) {
  if (v instanceof Date) return ['ts', v.toISOString()];
  if (typeof v === 'bigint') return v.toString();
  if (Array.isArray(v)) return v.map(norm);
  return v;
}

// ["rows", [column names], [[values]], rowCount] or ["count", command, rowCount]
function outcome(res, drop = []) {
  if (!res.fields || res.fields.length === 0) return ['count', res.command, res.rowCount];
  const names = res.fields.map((f) => f.name);
  const keep = names.map((n, i) => [n, i]).filter(([n]) => !drop.includes(n));
  const rows = res.rows.map((r) => keep.map(([n, i]) => norm(Array.isArray(r) ? r[i] : r[n])));
  return ['rows', keep.map(([n]) => n), rows, res.rowCount];
}

function errorOutcome(e) {
  if (!e.code) console.error(e && e.stack ? e.stack : e);
  return ['error', e.code || (e.constructor && e.constructor.name) || 'Error', { msg: String(e.message).split('\n')[0] }];
}

const canon = (x) => JSON.stringify(x, (k, v) => (k === 'msg' ? undefined : typeof v === 'bigint' ? v.toString() : v));
const show = (x, n = 1500) => {
  const s = JSON.stringify(x, (k, v) => (typeof v === 'bigint' ? v.toString() : v));
  return s.length <= n ? s : `${s.slice(0, n)}... (${s.length} chars)`;
};

function diff(want, got) {
  const isRows = (x) => Array.isArray(x) && x[0] === 'rows';
  if (isRows(want) && isRows(got)) {
    const lines = [];
    if (canon(want[1]) !== canon(got[1])) lines.push(`   columns: reference ${show(want[1])} / shardgate ${show(got[1])}`);
    if (want[3] !== got[3]) lines.push(`   row count: reference ${want[3]} / shardgate ${got[3]}`);
    const w = want[2].map(canon);
    const g = got[2].map(canon);
    lines.push(`   rows: reference ${w.length} / shardgate ${g.length}`);
    // multiset difference: duplicated rows show up too
    const minus = (a, b) => {
      const left = new Map();
      b.forEach((r) => left.set(r, (left.get(r) || 0) + 1));
      return a.filter((r) => {
        const n = left.get(r) || 0;
        if (n > 0) left.set(r, n - 1);
        return n === 0;
      });
    };
    const onlyW = minus(w, g);
    const onlyG = minus(g, w);
    onlyW.slice(0, 8).forEach((r) => lines.push(`   - only in reference: ${r}`));
    onlyG.slice(0, 8).forEach((r) => lines.push(`   + only in shardgate: ${r}`));
    if (onlyW.length > 8 || onlyG.length > 8) lines.push(`   (${onlyW.length} rows only in reference, ${onlyG.length} only in shardgate in all)`);
    for (let k = 0; k < Math.max(w.length, g.length); k += 1) {
      if (w[k] !== g[k]) {
        lines.push(`   first difference at row ${k}: reference ${w[k]} / shardgate ${g[k]}`);
        break;
      }
    }
    return lines.join('\n');
  }
  const isOutcome = (x) => Array.isArray(x) && ['rows', 'error', 'count'].includes(x[0]);
  if (Array.isArray(want) && Array.isArray(got) && !isOutcome(want) && !isOutcome(got) && want.length === got.length) {
    const lines = [];
    want.forEach((a, k) => {
      const b = got[k];
      if (canon(a) !== canon(b)) {
        const sub = diff(a, b);
        lines.push(sub.includes('rows:') ? `   [${k}]:\n${sub}` : `   [${k}] reference: ${show(a, 600)}\n   [${k}] shardgate: ${show(b, 600)}`);
      }
    });
    return lines.join('\n');
  }
  return `   reference: ${show(want)}\n   shardgate: ${show(got)}`;
}

// Each check ends PASS, REFUSED (the reference succeeded, shardgate refused with 0A000 and a
// message, and the check is in REFUSALS; a 0A000 elsewhere is a FAIL), KNOWN GAP (the check is in
// KNOWN_GAPS and differs in exactly its known way), FIXED (a known gap that now answers like the
// reference: a FAIL, so the list cannot go stale) or FAIL: the same rules as tests/drivers/python/matrix.py.

// Documented refusals (0A000 with a message saying what to change): none for node-postgres.
const REFUSALS = {};

const isError = (o, code) => Array.isArray(o) && o.length === 3 && o[0] === 'error' && (code === undefined || o[1] === code);
const isRefusal = (want, got) => !isError(want) && isError(got, '0A000') && Boolean(got[2] && String(got[2].msg).trim());
// Known gaps: still run and compared; each must differ in exactly its known way.
const KNOWN_GAPS = {};

class Matrix {
  constructor(refusals, knownGaps) {
    this.refusals = refusals;
    this.knownGaps = knownGaps;
    const both = Object.keys(refusals).filter((k) => k in knownGaps);
    if (both.length) throw new Error(`both a documented refusal and a known gap: ${both}`);
    this.checks = 0;
    this.passed = 0;
    this.refused = [];
    this.gaps = [];
    this.failed = [];
    this.seen = new Set();
  }
  verdict(name, v) {
    this.last = v;
    if (v === 'pass') this.passed += 1;
    else if (v === 'refused') this.refused.push(name);
    else if (v === 'gap') this.gaps.push(name);
    else this.failed.push(name);
    return v;
  }
  compare(name, want, got) {
    this.checks += 1;
    this.seen.add(name);
    const gap = Object.prototype.hasOwnProperty.call(this.knownGaps, name) ? this.knownGaps[name] : null;
    const refusable = Object.prototype.hasOwnProperty.call(this.refusals, name);
    if (canon(want) === canon(got)) {
      if (gap) {
        console.log(`FIXED ${DRIVER} ${name}: remove it from the known gaps (${gap.reason})`);
        return this.verdict(name, 'fail');
      }
      console.log(`PASS ${DRIVER} ${name}`);
      return this.verdict(name, 'pass');
    }
    if (refusable && isRefusal(want, got)) {
      console.log(`REFUSED ${DRIVER} ${name}: ${got[2].msg}`);
      return this.verdict(name, 'refused');
    }
    if (gap && gap.matches(want, got)) {
      console.log(`KNOWN GAP ${DRIVER} ${name} (${gap.reason}): reference ${show(want, 300)}, proxy ${show(got, 300)}`);
      return this.verdict(name, 'gap');
    }
    let why = '';
    if (gap) why = ` (a known gap, but not the known difference: ${gap.shape})`;
    else if (refusable) why = ' (a documented refusal, but not a 0A000 with a message after the reference succeeded)';
    else if (isRefusal(want, got)) why = " (a 0A000 refusal that is not in this driver's allowlist of documented refusals)";
    console.log(`FAIL ${DRIVER} ${name}${why}\n${diff(want, got)}`);
    return this.verdict(name, 'fail');
  }
  expect(name, cond, detail) {
    this.checks += 1;
    this.seen.add(name);
    if (cond) {
      console.log(`PASS ${DRIVER} ${name}`);
      this.verdict(name, 'pass');
    } else {
      console.log(`FAIL ${DRIVER} ${name}: ${detail}`);
      this.verdict(name, 'fail');
    }
  }
  // the summary line; false when the run failed
  finish() {
    for (const name of [...Object.keys(this.refusals), ...Object.keys(this.knownGaps)]) {
      if (this.seen.has(name)) continue;
      console.log(`FAIL ${DRIVER} ${name}: listed as a ${name in this.refusals ? 'documented refusal' : 'known gap'} but no such check ran`);
      this.failed.push(name);
    }
    if (this.failed.length) {
      console.log(`${DRIVER}: FAILED (${this.failed.length} of ${this.checks} checks): ${this.failed.join(', ')}`);
      return false;
    }
    console.log(`${DRIVER}: ok (${this.passed} passed, ${this.refused.length} refused, ${this.gaps.length} known gaps)`);
    return true;
  }
}

async function capture(fn) {
  try {
    return await fn();
  } catch (e) {
    return errorOutcome(e);
  }
}

function ts(y, m, d, h = 0) {
  return new Date(Date.UTC(y, m - 1, d, h));
}

async function main() {
  const [idsPath, refDsn, pxDsn] = process.argv.slice(2);
  const ids = loadIds(idsPath);
  const kinds = Object.keys(ids).filter((k) => k !== 'missing');
  const m = new Matrix(REFUSALS, KNOWN_GAPS);

  const sides = {};
  const connect = async (dsn) => {
    const c = new pg.Client({ connectionString: dsn, statement_timeout: 30000, query_timeout: 30000, connectionTimeoutMillis: 10000 });
    c.on('error', (e) => console.error(`client error: ${e.message}`));
    await c.connect();
    return c;
  };
  sides.ref = await connect(refDsn);
  sides.px = await connect(pxDsn);

  // a check that threw half-way may have left its transaction open: end it
  const run = async (fn, side) => {
    const o = await capture(() => fn(sides[side], side));
    if (o[0] === 'error') await sides[side].query('ROLLBACK').catch(() => {});
    return o;
  };
  const check = async (name, fn, post = (o) => o) => {
    const want = post(await run(fn, 'ref'));
    const got = post(await run(fn, 'px'));
    m.compare(name, want, got);
    return want;
  };
  const q = async (c, text, values, drop) => outcome(await c.query(text, values), drop);
  const named = async (c, name, text, values, drop) => outcome(await c.query({ name, text, values }), drop);
  const all = async (fns) => {
    const out = [];
    for (const f of fns) out.push(await f());
    return out;
  };

  // ---- unnamed parameterized queries (Parse/Bind/Execute on the unnamed statement)
  for (const kind of [...kinds, 'missing']) {
    await check(`unnamed/by-id/${kind}`, (c) => all(ids[kind].map((i) => () => q(c, `${SEL} WHERE id = $1`, [i]))));
  }
  await check('unnamed/merchant-scan', (c) => q(c, `${SEL} WHERE merchant_id = $1 ORDER BY id`, [7]));
  const want = await check('unnamed/all-ordered-by-id', (c) => q(c, `${SEL} ORDER BY id`));
  m.expect('unnamed/all-ordered-by-id reference rows', want[0] === 'rows' && want[2].length === 400, show(want.slice(0, 2)));
  await check('unnamed/id-any-array', (c) => q(c, `${SEL} WHERE id = ANY($1::bigint[]) ORDER BY id`, [kinds.flatMap((k) => ids[k]).map(String)]));
  await check('unnamed/group-by', (c) => q(c, 'SELECT pay_status, count(*), sum(order_amount), avg(order_amount) FROM t_order WHERE merchant_id <= $1 GROUP BY 1 ORDER BY 1 NULLS FIRST', [20]));
  await check('unnamed/time-range', (c) => q(c, `${SEL} WHERE create_time >= $1 AND create_time < $2 ORDER BY create_time, id`, [ts(2026, 8, 1), ts(2026, 9, 15)]));
  await check('unnamed/order-limit-offset', (c) => q(c, `${SEL} ORDER BY order_amount DESC NULLS LAST, id LIMIT $1 OFFSET $2`, [10, 5]));
  await check('rowmode-array/merchant-in', (c) => c.query({ text: `${SEL} WHERE merchant_id IN ($1, $2) ORDER BY id`, values: [4, 12], rowMode: 'array' }).then((r) => outcome(r)));

  // ---- named statements: parsed once per connection, executed with new values
  await check('named/by-id-every-kind', (c) => all([...kinds, 'missing'].flatMap((k) => ids[k].map((i) => () => named(c, 'by_id', `${SEL} WHERE id = $1`, [i])))));
  await check('named/count-by-merchant', (c) => all([1, 2, 3, 9, 17, 40].map((mm) => () => named(c, 'count_m', 'SELECT count(*), sum(order_amount) FROM t_order WHERE merchant_id = $1', [mm]))));
  const newRows = [
    [9100002n, 'NP-1', 22, '5.00', 'NEW', ts(2026, 11, 20, 1)],
    [40004858n, 'NP-2', 1, '6.10', 'NEW', ts(2026, 10, 20, 1)],
    [70001n, 'NP-3', 23, null, 'PAID', ts(2026, 9, 21, 1)],
    [(1n << 22n) + 7777n, 'NP-4', 24, '1.00', null, ts(2026, 8, 22, 1)],
    [1500000000000n, 'NP-5', 25, '9.99', 'NEW', ts(2026, 7, 23, 1)],
    [snowflakeShaped(6, 99), 'NP-6', 26, '1.01', 'NEW', ts(2026, 6, 24, 1)],
    [-70001n, 'NP-7', 27, '2.02', 'NEW', ts(2026, 11, 1, 1)],
  ].map((r) => [r[0].toString(), ...r.slice(1)]);
  await check('named/insert-explicit-ids', (c) => all(newRows.map((r) => () => named(c, 'ins', `${INSERT} RETURNING id, order_no`, r))));
  await check('named/by-id/inserted', (c) => all(newRows.map((r) => () => named(c, 'by_id', `${SEL} WHERE id = $1`, [r[0]]))));
  await check('named/update-by-id', (c) => all(newRows.map((r) => () => named(c, 'upd', 'UPDATE t_order SET pay_status = $2, order_amount = order_amount + 1 WHERE id = $1', [r[0], 'NU']))));
  await check('named/after-update-by-id', (c) => q(c, `${SEL} WHERE order_no LIKE 'NP-%' ORDER BY order_no`));
  await check('named/delete-by-id', (c) => all(newRows.filter((_, k) => k % 2 === 0).map((r) => () => named(c, 'del', 'DELETE FROM t_order WHERE id = $1', [r[0]]))));
  await check('named/after-delete-by-id', (c) => q(c, `${SEL} WHERE order_no LIKE 'NP-%' ORDER BY order_no`));
  await check('unnamed/update-seeded-by-id', (c) => all(kinds.map((k) => () => q(c, 'UPDATE t_order SET pay_status = $1 WHERE id = $2', ['NS', ids[k][0]]))));
  await check('unnamed/after-update-seeded-by-id', (c) => q(c, `${SEL} WHERE pay_status = 'NS' ORDER BY id`));

  // ---- generated id (INSERT without id), compared without the id
  await check('unnamed/insert-generated-id', async (c) => {
    const r = await c.query('INSERT INTO t_order (order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5) RETURNING *', ['GEN-N1', 13, '12.34', 'NEW', ts(2026, 11, 3, 4)]);
    const id = r.rows[0].id;
    return [outcome(r, ['id']), await q(c, `${SEL} WHERE id = $1`, [id], ['id']), await named(c, 'upd', 'UPDATE t_order SET pay_status = $2, order_amount = order_amount + 1 WHERE id = $1', [id, 'NU'])];
  });

  // ---- transactions on one client
  await check('client/transaction-rollback', async (c) => {
    const stats = 'SELECT merchant_id, count(*), sum(order_amount) FROM t_order WHERE merchant_id IN ($1, $2) GROUP BY 1 ORDER BY 1';
    const before = await q(c, stats, [35, 18]);
    await c.query('BEGIN');
    const a = await q(c, 'DELETE FROM t_order WHERE merchant_id = $1', [35]);
    const b = await q(c, 'UPDATE t_order SET order_amount = 0 WHERE merchant_id = $1', [18]);
    const inside = await q(c, stats, [35, 18]);
    await c.query('ROLLBACK');
    return [before, a, b, inside, await q(c, stats, [35, 18])];
  });
  await check('client/transaction-error-25P02', async (c) => {
    await c.query('BEGIN');
    const out = [await q(c, 'UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2', ['E', 39])];
    out.push(await capture(() => q(c, 'SELECT order_amount / 0 FROM t_order WHERE merchant_id = $1 AND order_amount IS NOT NULL', [39])));
    out.push(await capture(() => q(c, 'SELECT count(*) FROM t_order WHERE merchant_id = $1', [39])));
    out.push(await q(c, 'COMMIT'));
    out.push(await q(c, "SELECT count(*) FROM t_order WHERE pay_status = 'E'"));
    return out;
  });

  // ---- pg.Pool: concurrent queries over a few connections
  const pools = { ref: new pg.Pool({ connectionString: refDsn, max: 4 }), px: new pg.Pool({ connectionString: pxDsn, max: 4 }) };
  for (const p of Object.values(pools)) p.on('error', (e) => console.error(`pool error: ${e.message}`));
  const poolWork = (pool) => {
    const jobs = [];
    for (let k = 0; k < 40; k += 1) {
      const kind = kinds[k % kinds.length];
      const id = ids[kind][k % ids[kind].length];
      if (k % 4 === 0) jobs.push(pool.query(`${SEL} WHERE id = $1`, [id.toString()]).then((r) => outcome(r), errorOutcome));
      else if (k % 4 === 1) jobs.push(pool.query(`${SEL} WHERE merchant_id = $1 ORDER BY id`, [1 + (k % 40)]).then((r) => outcome(r), errorOutcome));
      else if (k % 4 === 2) jobs.push(pool.query({ name: 'pool_count', text: 'SELECT count(*), max(create_time) FROM t_order WHERE merchant_id <= $1', values: [k] }).then((r) => outcome(r), errorOutcome));
      else jobs.push(pool.query(`${SEL} ORDER BY create_time DESC, id LIMIT 5 OFFSET $1`, [k]).then((r) => outcome(r), errorOutcome));
    }
    return Promise.all(jobs);
  };
  await check('pool/40-concurrent-queries', (_c, side) => poolWork(pools[side]));
  await check('pool/transaction-commit', async (_c, side) => {
    const c = await pools[side].connect();
    try {
      await c.query('BEGIN');
      const a = await q(c, 'UPDATE t_order SET pay_status = $1 WHERE merchant_id = $2', ['PC', 19]);
      const b = await q(c, 'INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES ($1, $2, $3, $4, $5, $6), ($7, $8, $9, $10, $11, $12)', [
        '61000001', 'NPC-1', 19, '1.00', 'PC', ts(2026, 10, 1), '61000002', 'NPC-2', 20, '2.00', 'PC', ts(2026, 9, 1)]);
      await c.query('COMMIT');
      return [a, b, await q(c, `${SEL} WHERE pay_status = 'PC' ORDER BY id`)];
    } finally {
      c.release();
    }
  });
  await check('pool/transaction-rollback', async (_c, side) => {
    const c = await pools[side].connect();
    try {
      await c.query('BEGIN');
      const a = await q(c, 'DELETE FROM t_order WHERE merchant_id IN ($1, $2)', [19, 20]);
      const inside = await q(c, 'SELECT count(*) FROM t_order WHERE merchant_id IN (19, 20)');
      await c.query('ROLLBACK');
      return [a, inside, await q(c, 'SELECT count(*) FROM t_order WHERE merchant_id IN (19, 20)')];
    } finally {
      c.release();
    }
  });

  // ---- errors
  await check('error/undefined-column', (c) => q(c, 'SELECT nocol FROM t_order WHERE merchant_id = $1', [1]));
  await check('error/duplicate-order-no-same-merchant-and-month', (c) => q(c, INSERT, ['62000001', 'S00040', 1, null, null, ts(2026, 10, 17)]));
  await check('error/duplicate-order-no-other-merchant', (c) => q(c, INSERT, ['62000002', 'S00041', 2, null, null, ts(2026, 10, 17)]));
  // what those left behind (when they did not fail: the known gap) is not compared again below
  for (const c of [sides.ref, sides.px]) await c.query('DELETE FROM t_order WHERE id IN (62000001, 62000002)');

  await check('final/table', (c) => q(c, `${SEL} ORDER BY order_no`), (o) => {
    if (o[0] !== 'rows') return o;
    return ['rows', o[1], o[2].map((r) => (String(r[1]).startsWith('GEN') ? [null, ...r.slice(1)] : r)), o[3]];
  });

  await Promise.all([sides.ref.end(), sides.px.end(), pools.ref.end(), pools.px.end()]);
  if (!m.finish()) process.exit(1);
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(2);
});
