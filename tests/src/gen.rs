//! Randomized, seeded statement generator for the random differential tester
//! (`tests/tests/random_differential.rs`).
//!
//! Every statement is generated from its own `StdRng`, seeded from the run
//! seed and the statement index, so statement *i* of a seed is the same text on
//! every run and on both protocols. (The one exception: ids that shardgate
//! generates for rows inserted without `id` are fed back with
//! [`Gen::note_generated_id`] and may then appear in later statements; their
//! values depend on the clock, the statement shapes do not.)
//!
//! A statement carries its values as pieces that render either as literals
//! (simple protocol) or, where the generator chose so, as `$n` bind
//! parameters (extended protocol). Numeric values (`order_amount`) are always
//! literals: the extended-protocol client binds only `int8`, `text`,
//! `timestamptz` and `int8[]`.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Merchants used most of the time are `1..=MERCHANT_MAX`.
pub const MERCHANT_MAX: i64 = 40;
/// `pay_status` values (plus NULL).
/// (with values that hold quotes and backslashes: they must reach the shards as the same literal)
pub const STATUSES: [&str; 7] = ["NEW", "PAID", "REFUND", "CLOSED", "PENDING", "it's", "x\\''y"];
/// The months rows are written to (month tables `t_order_202511` .. `t_order_202702`).
pub const MONTHS: [(i32, u32); 16] = [
    (2025, 11),
    (2025, 12),
    (2026, 1),
    (2026, 2),
    (2026, 3),
    (2026, 4),
    (2026, 5),
    (2026, 6),
    (2026, 7),
    (2026, 8),
    (2026, 9),
    (2026, 10),
    (2026, 11),
    (2026, 12),
    (2027, 1),
    (2027, 2),
];
/// shardgate's default snowflake epoch (`ids.epoch_ms`).
pub const SNOWFLAKE_EPOCH_MS: i64 = 1_704_067_200_000;

/// A bind value of the extended protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// int8.
    Int(i64),
    /// text.
    Text(String),
    /// timestamptz, microseconds since 2000-01-01 00:00 UTC (the binary format).
    Ts(i64),
    /// int8[].
    IntArray(Vec<i64>),
}

/// How a timestamp literal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsStyle {
    /// `2026-10-31 23:59:59[.ffffff]±hh[:mm]`.
    Full,
    /// `2025-12-31 23:00±hh` (no seconds).
    NoSeconds,
    /// `2027-01-01` (midnight, no offset: read in the session time zone, UTC here).
    DateOnly,
}

/// A timestamptz value with the way it is spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ts {
    pub y: i32,
    pub m: u32,
    pub d: u32,
    pub h: u32,
    pub mi: u32,
    pub s: u32,
    pub us: u32,
    /// Offset east of UTC in minutes; `None`: no offset written (UTC session).
    pub off_min: Option<i32>,
    pub style: TsStyle,
    /// Another spelling of (about) this instant, used as the literal's text
    /// (named zones, `24:00:00`, `T…Z`, …); such values are never bind parameters.
    pub raw: Option<String>,
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days in a month.
pub fn days_in_month(y: i32, m: u32) -> u32 {
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (days_from_civil(ny, nm, 1) - days_from_civil(y, m, 1)) as u32
}

const MICROS_PER_DAY: i64 = 86_400_000_000;
/// 2000-01-01 as a day number since 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

impl Ts {
    #[allow(clippy::too_many_arguments)]
    fn new(y: i32, m: u32, d: u32, h: u32, mi: u32, s: u32, us: u32, off_min: Option<i32>) -> Ts {
        Ts { y, m, d, h, mi, s, us, off_min, style: TsStyle::Full, raw: None }
    }

    /// The SQL string literal, quoted.
    pub fn literal(&self) -> String {
        format!("'{}'", self.text())
    }

    /// The text of the value, unquoted.
    pub fn text(&self) -> String {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let date = format!("{:04}-{:02}-{:02}", self.y, self.m, self.d);
        if self.style == TsStyle::DateOnly {
            return date;
        }
        let mut t = format!("{date} {:02}:{:02}", self.h, self.mi);
        if self.style == TsStyle::Full {
            t.push_str(&format!(":{:02}", self.s));
            if self.us != 0 {
                t.push_str(&format!(".{:06}", self.us));
            }
        }
        if let Some(off) = self.off_min {
            let sign = if off < 0 { '-' } else { '+' };
            let a = off.abs();
            if a % 60 == 0 {
                t.push_str(&format!("{sign}{:02}", a / 60));
            } else {
                t.push_str(&format!("{sign}{:02}:{:02}", a / 60, a % 60));
            }
        }
        t
    }

    /// Microseconds since 2000-01-01 00:00 UTC.
    pub fn utc_micros(&self) -> i64 {
        let days = days_from_civil(self.y, self.m, self.d) - PG_EPOCH_DAYS;
        let secs = i64::from(self.h) * 3600 + i64::from(self.mi) * 60 + i64::from(self.s);
        days * MICROS_PER_DAY + secs * 1_000_000 + i64::from(self.us) - i64::from(self.off_min.unwrap_or(0)) * 60_000_000
    }

    /// `(year, month)` of the instant in UTC (the month table the row belongs to).
    pub fn utc_month(&self) -> (i64, u32) {
        let days = self.utc_micros().div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
        let (y, m, _) = civil_from_days(days);
        (y, m)
    }
}

/// Formats microseconds since 2000-01-01 UTC like PostgreSQL's text output in a UTC session.
pub fn format_pg_micros(micros: i64) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
    let rest = micros.rem_euclid(MICROS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let secs = rest / 1_000_000;
    let us = rest % 1_000_000;
    let mut s = format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if us != 0 {
        s.push_str(&format!(".{us:06}"));
        while s.ends_with('0') {
            s.pop();
        }
    }
    s.push_str("+00");
    s
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Part of a statement: SQL text, or a value that renders as a literal or a `$n`.
#[derive(Debug, Clone)]
enum Piece {
    Sql(String),
    /// Literal text, and the parameter it becomes in the extended protocol (None: always literal).
    Val(String, Option<Param>),
}

/// What a statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
}

impl Kind {
    /// INSERT, UPDATE or DELETE.
    pub fn is_dml(self) -> bool {
        self != Kind::Select
    }
}

/// One cell of an INSERT row.
#[derive(Debug, Clone)]
enum Cell {
    Val(String, Option<Param>),
    /// The id of a row whose id shardgate generates.
    NoId,
}

#[derive(Debug, Clone)]
struct InsertSpec {
    cols: Vec<&'static str>,
    /// `(order_no, cells, id generated by shardgate)`.
    rows: Vec<(String, Vec<Cell>, bool)>,
    returning: Option<String>,
    on_conflict: Option<String>,
}

#[derive(Debug, Clone)]
enum Body {
    Pieces(Vec<Piece>),
    Insert(InsertSpec),
}

/// One generated statement.
#[derive(Debug, Clone)]
pub struct Stmt {
    /// Index in its seed's sequence (0-based; the initial load has its own numbering).
    pub index: usize,
    /// What kind of statement this is, for the report (`point/id= [snowflake]`, `group/having-num`, …).
    pub shape: String,
    pub kind: Kind,
    /// The row order is part of the answer (ORDER BY … id, or INSERT … RETURNING).
    pub ordered: bool,
    body: Body,
}

impl Stmt {
    /// The statement text and its bind values. `ext`: render the chosen values as `$n`.
    /// `fill`: ids for rows inserted without one, by order_no (the reference is given the
    /// ids shardgate generated).
    pub fn render(&self, ext: bool, fill: &HashMap<String, i64>) -> (String, Vec<Param>) {
        let mut sql = String::new();
        let mut params = Vec::new();
        let mut val = |sql: &mut String, lit: &str, p: &Option<Param>| match p {
            Some(p) if ext => {
                params.push(p.clone());
                sql.push_str(&format!("${}", params.len()));
            }
            _ => sql.push_str(lit),
        };
        match &self.body {
            Body::Pieces(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Sql(s) => sql.push_str(s),
                        Piece::Val(lit, p) => val(&mut sql, lit, p),
                    }
                }
            }
            Body::Insert(spec) => {
                let has_id = spec.cols.contains(&"id");
                let add_id = !has_id && spec.rows.iter().any(|(no, _, _)| fill.contains_key(no));
                let mut cols: Vec<&str> = spec.cols.clone();
                if add_id {
                    cols.insert(0, "id");
                }
                sql.push_str(&format!("INSERT INTO t_order ({}) VALUES ", cols.join(", ")));
                for (i, (no, cells, _)) in spec.rows.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    sql.push('(');
                    let mut first = true;
                    let mut sep = |sql: &mut String| {
                        if !first {
                            sql.push_str(", ");
                        }
                        first = false;
                    };
                    if add_id {
                        sep(&mut sql);
                        match fill.get(no) {
                            Some(id) => sql.push_str(&id.to_string()),
                            None => sql.push_str("DEFAULT"),
                        }
                    }
                    for c in cells {
                        match c {
                            Cell::Val(lit, p) => {
                                sep(&mut sql);
                                val(&mut sql, lit, p);
                            }
                            Cell::NoId => {
                                sep(&mut sql);
                                match fill.get(no) {
                                    Some(id) => sql.push_str(&id.to_string()),
                                    None => sql.push_str("DEFAULT"),
                                }
                            }
                        }
                    }
                    sql.push(')');
                }
                if let Some(c) = &spec.on_conflict {
                    sql.push_str(&format!(" ON CONFLICT {c}"));
                }
                if let Some(r) = &spec.returning {
                    sql.push_str(&format!(" RETURNING {r}"));
                }
            }
        }
        (sql, params)
    }

    /// The simple-protocol text (every value a literal).
    pub fn sql(&self) -> String {
        self.render(false, &HashMap::new()).0
    }

    /// Order numbers of the rows this INSERT writes (empty for other statements).
    pub fn order_nos(&self) -> Vec<String> {
        match &self.body {
            Body::Insert(spec) => spec.rows.iter().map(|(no, _, _)| no.clone()).collect(),
            Body::Pieces(_) => Vec::new(),
        }
    }

    /// Order numbers of the rows this INSERT gives no id (shardgate generates them;
    /// the statement returns `id` and `order_no`).
    pub fn generated_id_rows(&self) -> Vec<String> {
        match &self.body {
            Body::Insert(spec) => spec.rows.iter().filter(|(_, _, generated)| *generated).map(|(no, _, _)| no.clone()).collect(),
            Body::Pieces(_) => Vec::new(),
        }
    }
}

/// Statement builder: its own rng, the pieces, whether values may become parameters.
struct R {
    rng: StdRng,
    out: Vec<Piece>,
    params: bool,
}

impl R {
    fn s(&mut self, sql: &str) {
        match self.out.last_mut() {
            Some(Piece::Sql(prev)) => prev.push_str(sql),
            _ => self.out.push(Piece::Sql(sql.to_string())),
        }
    }
    fn p(&mut self, prob: f64) -> bool {
        self.rng.gen_bool(prob)
    }
    fn n(&mut self, lo: i64, hi: i64) -> i64 {
        self.rng.gen_range(lo..=hi)
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.rng.gen_range(0..xs.len())]
    }
    fn as_param(&mut self) -> bool {
        self.params && self.rng.gen_bool(0.8)
    }
    /// A bigint value (sometimes with an explicit cast in the literal form).
    fn int(&mut self, v: i64) {
        let param = self.as_param();
        let lit = if self.rng.gen_bool(0.04) { format!("{v}::bigint") } else { v.to_string() };
        self.out.push(Piece::Val(lit, param.then_some(Param::Int(v))));
    }
    fn text(&mut self, v: &str) {
        let param = self.as_param();
        self.out.push(Piece::Val(quote(v), param.then(|| Param::Text(v.to_string()))));
    }
    fn ts(&mut self, t: &Ts) {
        let param = self.as_param() && t.raw.is_none();
        let lit = if self.rng.gen_bool(0.05) { format!("{}::timestamptz", t.literal()) } else { t.literal() };
        self.out.push(Piece::Val(lit, param.then_some(Param::Ts(t.utc_micros()))));
    }
    /// Numeric literal (never a parameter).
    fn num(&mut self, v: &str) {
        self.out.push(Piece::Val(v.to_string(), None));
    }
    /// `= ANY(ARRAY[…])` / `= ANY($n)`.
    fn any(&mut self, vs: &[i64]) {
        let param = self.as_param();
        let lit = format!("ARRAY[{}]::bigint[]", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "));
        self.s("= ANY(");
        self.out.push(Piece::Val(lit, param.then(|| Param::IntArray(vs.to_vec()))));
        self.s(")");
    }
    /// Starts a new piece (so that text written from here on can be told apart).
    fn mark(&mut self) -> usize {
        self.out.push(Piece::Sql(String::new()));
        self.out.len() - 1
    }

    /// Qualifies the column names in the SQL text written since piece `from`
    /// (`merchant_id` → `t_order.merchant_id`), outside string literals.
    fn qualify(&mut self, from: usize, prefix: &str) {
        const COLS: [&str; 6] = ["id", "order_no", "merchant_id", "order_amount", "pay_status", "create_time"];
        for p in self.out.iter_mut().skip(from) {
            let Piece::Sql(text) = p else { continue };
            let mut out = String::with_capacity(text.len() + 16);
            let b: Vec<char> = text.chars().collect();
            let mut i = 0;
            let mut in_str = false;
            while i < b.len() {
                let c = b[i];
                if c == '\'' {
                    in_str = !in_str;
                    out.push(c);
                    i += 1;
                } else if !in_str && (c.is_ascii_alphabetic() || c == '_') {
                    let start = i;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_') {
                        i += 1;
                    }
                    let word: String = b[start..i].iter().collect();
                    let after_dot = start > 0 && b[start - 1] == '.';
                    if COLS.contains(&word.as_str()) && !after_dot {
                        out.push_str(prefix);
                    }
                    out.push_str(&word);
                } else {
                    out.push(c);
                    i += 1;
                }
            }
            *text = out;
        }
    }

    fn int_list(&mut self, vs: &[i64]) {
        self.s("(");
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                self.s(", ");
            }
            self.int(*v);
        }
        self.s(")");
    }
}

/// A row the generator inserted (or planned to insert).
#[derive(Debug, Clone)]
pub struct Known {
    /// None until shardgate's generated id is fed back.
    pub id: Option<i64>,
    pub merchant: i64,
    pub order_no: String,
    pub ts: Ts,
    pub generated: bool,
    /// The amount it was inserted with (a numeric literal), if any.
    pub amount: Option<String>,
}

/// The generator of one seed.
pub struct Gen {
    pub seed: u64,
    index: usize,
    counter: u64,
    pool: Vec<Known>,
    by_order_no: HashMap<String, usize>,
    used_ids: HashSet<i64>,
    /// Values in their usual spellings only (the initial load must succeed).
    plain: bool,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A rough label of an id value, for the report.
pub fn id_kind(id: i64) -> &'static str {
    match id {
        i64::MIN..=-1 => "negative",
        0..=3000 => "small",
        3001..=4_194_303 => "bigserial<2^22",
        4_194_304..=0xFFFF_FFFF => "2^22..2^32",
        0x1_0000_0000..=0xFF_FFFF_FFFF => "bigserial>2^32",
        0x7FFF_FFFF_FFFF_0000..=i64::MAX => "near-i64-max",
        _ => "snowflake-like",
    }
}

impl Gen {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Gen {
        Gen { seed, index: 0, counter: 0, pool: Vec::new(), by_order_no: HashMap::new(), used_ids: HashSet::new(), plain: false }
    }

    fn rng_for(&self, stream: u64, index: u64) -> StdRng {
        StdRng::seed_from_u64(splitmix(splitmix(self.seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407)) ^ index))
    }

    /// A new order number, unique for this seed.
    fn order_no(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}-{:05}", self.seed % 100_000, self.counter)
    }

    /// Records the id shardgate generated for a row inserted without one.
    pub fn note_generated_id(&mut self, order_no: &str, id: i64) {
        if let Some(&i) = self.by_order_no.get(order_no) {
            self.pool[i].id = Some(id);
        }
        self.used_ids.insert(id);
    }

    /// Rows the generator knows of.
    pub fn known(&self) -> &[Known] {
        &self.pool
    }

    /// The initial load: about `rows` rows in multi-row INSERTs of up to 50 rows with
    /// explicit ids of every kind, plus a few INSERTs without ids (shardgate generates
    /// them; the caller gives the reference the returned ids). Every value a literal.
    pub fn initial_load(&mut self, rows: usize) -> Vec<Stmt> {
        let mut out = Vec::new();
        let mut left = rows;
        self.plain = true;
        let mut i = 0u64;
        while left > 0 {
            let mut r = R { rng: self.rng_for(1, i), out: Vec::new(), params: false };
            let generated = i % 6 == 5;
            let n = left.min(if generated { 10 } else { 50 });
            left -= n;
            let spec = self.insert_spec(&mut r, n, if generated { IdMode::Generated } else { IdMode::Explicit }, "L");
            let spec = InsertSpec { returning: generated.then(|| "id, order_no".to_string()), on_conflict: None, ..spec };
            out.push(Stmt { index: i as usize, shape: "load".into(), kind: Kind::Insert, ordered: true, body: Body::Insert(spec) });
            i += 1;
        }
        self.plain = false;
        out
    }

    /// The next statement.
    pub fn next_stmt(&mut self) -> Stmt {
        let index = self.index;
        self.index += 1;
        let mut rng = self.rng_for(2, index as u64);
        let params = rng.gen_bool(0.7);
        let mut r = R { rng, out: Vec::new(), params };
        let roll = r.n(0, 999);
        let (kind, shape, ordered, body) = match roll {
            0..=129 => {
                let (s, o) = self.sel_point(&mut r);
                (Kind::Select, s, o, None)
            }
            130..=289 => {
                let (s, o) = self.sel_scan(&mut r);
                (Kind::Select, s, o, None)
            }
            290..=369 => {
                let (s, o) = self.sel_agg(&mut r);
                (Kind::Select, s, o, None)
            }
            370..=499 => {
                let (s, o) = self.sel_group(&mut r);
                (Kind::Select, s, o, None)
            }
            500..=549 => {
                let (s, o) = self.sel_distinct(&mut r);
                (Kind::Select, s, o, None)
            }
            550..=609 => {
                let (s, o) = self.sel_nested(&mut r);
                (Kind::Select, s, o, None)
            }
            610..=639 => {
                let (s, o) = self.sel_expr(&mut r);
                (Kind::Select, s, o, None)
            }
            640..=659 => {
                let (k, s) = self.error_stmt(&mut r);
                (k, s, false, None)
            }
            660..=789 => {
                let (s, spec) = self.insert(&mut r);
                (Kind::Insert, s, true, Some(spec))
            }
            790..=909 => {
                let s = self.update(&mut r);
                (Kind::Update, s, false, None)
            }
            _ => {
                let s = self.delete(&mut r);
                (Kind::Delete, s, false, None)
            }
        };
        let body = match body {
            Some(spec) => Body::Insert(spec),
            None => Body::Pieces(std::mem::take(&mut r.out)),
        };
        Stmt { index, shape, kind, ordered, body }
    }

    // ---- values ----

    fn merchant(&self, r: &mut R) -> i64 {
        if r.p(0.9) {
            r.n(1, MERCHANT_MAX)
        } else {
            *r.pick(&[0, -1, -7, -8, -9, -15, 41, 48, 100])
        }
    }

    /// A merchant for written rows: mostly 1..=40, sometimes 0 or negative.
    fn data_merchant(&self, r: &mut R) -> i64 {
        if r.p(0.94) {
            r.n(1, MERCHANT_MAX)
        } else {
            *r.pick(&[0, -1, -3, -8, -9, -16])
        }
    }

    fn status(&self, r: &mut R) -> &'static str {
        STATUSES[r.rng.gen_range(0..STATUSES.len())]
    }

    fn amount(&self, r: &mut R) -> String {
        match r.n(0, 99) {
            0..=2 => "0.00".into(),
            3..=4 => format!("-{}.{:02}", r.n(1, 50), r.n(0, 99)),
            5..=6 => format!("{}.{:02}", r.n(1_000_000, 99_999_999), r.n(0, 99)),
            7 => "0.01".into(),
            _ => format!("{}.{:02}", r.n(0, 999), r.n(0, 99)),
        }
    }

    /// A predicate amount literal (sometimes with fewer or more decimals).
    fn amount_lit(&self, r: &mut R) -> String {
        match r.n(0, 9) {
            0 => r.n(0, 900).to_string(),
            1 => format!("{}.5", r.n(0, 900)),
            2 => format!("{}.125", r.n(0, 900)),
            _ => format!("{}.{:02}", r.n(0, 900), r.n(0, 99)),
        }
    }

    /// A timestamp for a written row: inside the month window in UTC, often near a month
    /// boundary, with various offsets.
    fn data_ts(&self, r: &mut R) -> Ts {
        if !self.plain && r.p(0.06) {
            return self.odd_ts(r, true);
        }
        let lo = Ts::new(2025, 11, 1, 0, 0, 0, 0, Some(0)).utc_micros();
        let hi = Ts::new(2027, 3, 1, 0, 0, 0, 0, Some(0)).utc_micros();
        loop {
            let (y, m) = *r.pick(&MONTHS);
            let off = match r.n(0, 9) {
                0..=3 => Some(0),
                4 => None,
                _ => Some(*r.pick(&[60, -60, 330, -180, 540, -480, 840, -720, 120, -300])),
            };
            let dim = days_in_month(y, m);
            let mut t = match r.n(0, 9) {
                // first minutes of a month
                0..=1 => Ts::new(y, m, 1, 0, r.n(0, 59) as u32, r.n(0, 59) as u32, 0, off),
                // last hour of a month
                2..=3 => Ts::new(y, m, dim, 23, r.n(0, 59) as u32, r.n(0, 59) as u32, 0, off),
                // exactly on a boundary
                4 => {
                    if r.p(0.5) {
                        Ts::new(y, m, 1, 0, 0, 0, 0, off)
                    } else {
                        Ts::new(y, m, dim, 23, 59, 59, 999_999, off)
                    }
                }
                _ => Ts::new(
                    y,
                    m,
                    r.n(1, i64::from(dim)) as u32,
                    r.n(0, 23) as u32,
                    r.n(0, 59) as u32,
                    r.n(0, 59) as u32,
                    if r.p(0.1) { r.n(1, 999_999) as u32 } else { 0 },
                    off,
                ),
            };
            if t.off_min.is_some() && t.s == 0 && t.us == 0 && r.p(0.2) {
                t.style = TsStyle::NoSeconds;
            }
            let u = t.utc_micros();
            if (lo..hi).contains(&u) {
                return t;
            }
        }
    }

    /// A month boundary written in one of the other spellings PostgreSQL accepts
    /// (`T…Z`, `24:00:00`, a leap second, `+0100`, ` UTC`, IANA zone names with and
    /// without daylight saving time, …). `data`: only spellings of instants inside
    /// the month window that every PostgreSQL accepts (for INSERTs).
    fn odd_ts(&self, r: &mut R, data: bool) -> Ts {
        // months with a margin on both sides of the window
        let (y, m) = *r.pick(&MONTHS[1..15]);
        let (py, pm) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
        let pd = days_in_month(py, pm);
        let start = Ts::new(y, m, 1, 0, 0, 0, 0, Some(0));
        let mi = if r.p(0.5) { 0 } else { r.n(1, 59) as u32 };
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let n = if r.p(0.07) {
            16
        } else if data {
            r.n(0, 9)
        } else {
            r.n(0, 15)
        };
        let (raw, approx) = match n {
            0 => (format!("{y:04}-{m:02}-01T00:{mi:02}:00Z"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            1 => (format!("{py:04}-{pm:02}-{pd:02} 24:00:00+00"), start.clone()),
            2 => (format!("{py:04}-{pm:02}-{pd:02} 23:59:60+00"), start.clone()),
            3 => (format!("{y:04}-{m:02}-01 01:{mi:02}:00+0100"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            4 => (format!("{y:04}-{m:02}-01 00:{mi:02}:00 UTC"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            // 20:00 in New York is 00:00 or 01:00 UTC of the next day (EDT/EST)
            5 => (format!("{py:04}-{pm:02}-{pd:02} 20:{mi:02}:00 America/New_York"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            // 00:30 in London is 00:30 (GMT) or 23:30 of the day before (BST) in UTC
            6 => (format!("{y:04}-{m:02}-01 00:30:00 Europe/London"), Ts::new(y, m, 1, 0, 0, 0, 0, Some(0))),
            7 => (format!("{y:04}-{m:02}-01 01:{mi:02}:00 +01"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            8 => (format!("{py:04}-{pm:02}-{pd:02} 23:{mi:02}:00-01"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            9 => (format!("{y:04}-{m:02}-01 09:{mi:02}:00 Asia/Tokyo"), Ts::new(y, m, 1, 0, mi, 0, 0, Some(0))),
            10 => (format!("{} 1 {y} 00:00 UTC", months[(m - 1) as usize]), start.clone()),
            11 => (format!("{y:04}-{m:02}-01 00:00:00.000001-00"), start.clone()),
            12 => (format!("{py:04}-{pm:02}-{pd:02} 23:00:00 Europe/Berlin"), start.clone()),
            13 => (format!("{y:04}{m:02}01T000000Z"), start.clone()),
            14 => ("infinity".to_string(), Ts::new(9999, 12, 31, 0, 0, 0, 0, Some(0))),
            // seven fractional digits: PostgreSQL rounds to the microsecond, here into the next month
            16 => (format!("{py:04}-{pm:02}-{pd:02} 23:59:59.9999995+00"), start.clone()),
            _ => ("-infinity".to_string(), Ts::new(1, 1, 1, 0, 0, 0, 0, Some(0))),
        };
        Ts { raw: Some(raw), ..approx }
    }

    /// A timestamp for a predicate: month and year boundaries, known rows' times, random ones.
    fn pred_ts(&self, r: &mut R) -> Ts {
        match r.n(0, 99) {
            0..=34 => {
                let fixed = [
                    Ts::new(2026, 10, 31, 23, 59, 59, 0, Some(0)),
                    Ts::new(2026, 11, 1, 0, 0, 0, 0, Some(0)),
                    Ts { style: TsStyle::NoSeconds, ..Ts::new(2025, 12, 31, 23, 0, 0, 0, Some(0)) },
                    Ts { style: TsStyle::DateOnly, ..Ts::new(2027, 1, 1, 0, 0, 0, 0, None) },
                    Ts::new(2026, 11, 1, 0, 30, 0, 0, Some(60)),
                    Ts::new(2026, 12, 31, 22, 0, 0, 0, Some(-180)),
                    Ts::new(2026, 2, 28, 23, 59, 59, 999_999, Some(0)),
                    Ts::new(2026, 3, 1, 0, 0, 0, 0, Some(0)),
                    Ts::new(2026, 6, 30, 23, 59, 59, 0, Some(-60)),
                    Ts::new(2026, 1, 1, 5, 30, 0, 0, Some(330)),
                    Ts { style: TsStyle::DateOnly, ..Ts::new(2026, 1, 1, 0, 0, 0, 0, None) },
                    Ts::new(2025, 11, 1, 0, 0, 0, 0, Some(0)),
                    Ts::new(2027, 2, 28, 23, 59, 59, 999_999, Some(0)),
                    Ts::new(2027, 3, 1, 0, 0, 0, 0, Some(0)),
                ];
                r.pick(&fixed).clone()
            }
            35..=59 => {
                // a month start, spelled in various ways
                let (y, m) = *r.pick(&MONTHS);
                match r.n(0, 4) {
                    0 => Ts { style: TsStyle::DateOnly, ..Ts::new(y, m, 1, 0, 0, 0, 0, None) },
                    1 => Ts::new(y, m, 1, 0, 0, 0, 0, Some(0)),
                    2 => Ts::new(y, m, 1, 1, 0, 0, 0, Some(60)),
                    3 => {
                        let d = days_in_month(y, m);
                        Ts::new(y, m, d, 23, 59, 59, 999_999, Some(0))
                    }
                    _ => {
                        let d = days_in_month(y, m);
                        Ts::new(y, m, d, 21, 0, 0, 0, Some(-180))
                    }
                }
            }
            60..=79 if !self.pool.is_empty() => {
                let k = self.pick_known(r);
                self.pool[k].ts.clone()
            }
            84..=91 => self.odd_ts(r, false),
            80..=83 => {
                let far = [Ts::new(2024, 12, 31, 0, 0, 0, 0, Some(0)), Ts { style: TsStyle::DateOnly, ..Ts::new(2028, 1, 1, 0, 0, 0, 0, None) }];
                r.pick(&far).clone()
            }
            _ => self.data_ts(r),
        }
    }

    /// A pair of timestamps `a <= b` (in UTC).
    fn ts_range(&self, r: &mut R) -> (Ts, Ts) {
        let a = self.pred_ts(r);
        let b = self.pred_ts(r);
        if a.utc_micros() <= b.utc_micros() {
            (a, b)
        } else {
            (b, a)
        }
    }

    fn snowflake(&self, r: &mut R, ms: Option<i64>, shard: Option<i64>) -> i64 {
        let ms = ms.unwrap_or_else(|| r.n(0, 110_000_000_000));
        let worker = if r.p(0.6) { 1 } else { r.n(0, 63) };
        let back = i64::from(r.p(0.1));
        let shard = shard.unwrap_or_else(|| r.n(0, 7));
        let seq = r.n(0, 4095);
        (ms << 22) | (worker << 16) | (back << 15) | (shard << 12) | seq
    }

    /// An id of any kind (not necessarily existing).
    fn random_id(&self, r: &mut R) -> i64 {
        match r.n(0, 99) {
            0..=24 => r.n(1, 3000),
            25..=44 => {
                if r.p(0.2) {
                    *r.pick(&[9_100_002, 40_004_858, 4_194_304, 4_194_305, 8_388_608, 9_100_001])
                } else {
                    r.n(4_194_305, 60_000_000)
                }
            }
            45..=59 => match r.n(0, 3) {
                0 => r.n(2_147_482_900, 2_147_484_400),
                1 => 10_000_000_000 + r.n(0, 100_000),
                2 => 1_000_000 + r.n(0, 100_000),
                _ => r.n(100_000, 999_999),
            },
            60..=91 => {
                if r.p(0.1) {
                    132_271_570_944_001_580
                } else {
                    self.snowflake(r, None, None)
                }
            }
            92..=96 => -r.n(1, 1000),
            _ => i64::MAX - r.n(0, 1000),
        }
    }

    /// A fresh id for an inserted row (unique in this seed).
    fn fresh_id(&mut self, r: &mut R, merchant: i64, ts: &Ts) -> i64 {
        loop {
            let id = if r.p(0.15) {
                // looks exactly like one shardgate would issue for this row
                let ms = ts.utc_micros() / 1000 + 946_684_800_000 - SNOWFLAKE_EPOCH_MS;
                self.snowflake(r, Some(ms.max(0)), Some(merchant.rem_euclid(8)))
            } else {
                self.random_id(r)
            };
            if self.used_ids.insert(id) {
                return id;
            }
        }
    }

    /// Index of a known row: recent rows more often.
    fn pick_known(&self, r: &mut R) -> usize {
        let n = self.pool.len();
        if n > 60 && r.p(0.5) {
            r.rng.gen_range(n - 60..n)
        } else {
            r.rng.gen_range(0..n)
        }
    }

    /// An id to look up: a known row's (with its merchant) or a random one.
    fn pick_id(&self, r: &mut R) -> (i64, Option<usize>) {
        if !self.pool.is_empty() && r.p(0.7) {
            let k = self.pick_known(r);
            if let Some(id) = self.pool[k].id {
                return (id, Some(k));
            }
        }
        (self.random_id(r), None)
    }

    fn id_label(&self, id: i64, k: Option<usize>) -> String {
        match k {
            Some(k) if self.pool[k].generated => "generated".into(),
            Some(_) => id_kind(id).into(),
            None => format!("{}, absent", id_kind(id)),
        }
    }

    // ---- predicates ----

    fn merchant_atom(&self, r: &mut R) {
        match r.n(0, 12) {
            0..=3 => {
                r.s("merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
            }
            4..=5 => {
                let k = r.n(1, 5);
                let ms: Vec<i64> = (0..k).map(|_| self.merchant(r)).collect();
                r.s("merchant_id IN ");
                r.int_list(&ms);
            }
            6 => {
                let a = self.merchant(r);
                let b = a + r.n(0, 6);
                r.s("merchant_id BETWEEN ");
                r.int(a);
                r.s(" AND ");
                r.int(b);
            }
            7 => {
                let op = *r.pick(&["<", ">", "<=", ">=", "<>"]);
                r.s(&format!("merchant_id {op} "));
                let m = self.merchant(r);
                r.int(m);
            }
            8 => {
                let k = r.n(1, 4);
                let ms: Vec<i64> = (0..k).map(|_| self.merchant(r)).collect();
                r.s("merchant_id ");
                r.any(&ms);
            }
            9 => {
                let m = self.merchant(r);
                r.int(m);
                r.s(" = merchant_id");
            }
            10 => {
                r.s("NOT (merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
                r.s(")");
            }
            11 => {
                // other spellings of an equality
                let m = self.merchant(r);
                match r.n(0, 4) {
                    0 => r.s(&format!("merchant_id = '{m}'")),
                    1 => r.s(&format!("merchant_id = {m}.0")),
                    2 => r.s(&format!("merchant_id IS NOT DISTINCT FROM {m}")),
                    3 => r.s(&format!("merchant_id::text = '{m}'")),
                    _ => r.s(&format!("merchant_id = CAST('{m}' AS bigint)")),
                }
            }
            _ => {
                let t = if r.p(0.5) { "merchant_id IS NULL" } else { "merchant_id IS NOT NULL" };
                r.s(t);
            }
        }
    }

    fn id_atom(&self, r: &mut R) {
        match r.n(0, 8) {
            8 => {
                let (id, _) = self.pick_id(r);
                r.s(&format!("id = '{id}'"));
            }
            0..=2 => {
                let (id, _) = self.pick_id(r);
                r.s("id = ");
                r.int(id);
            }
            3 => {
                let k = r.n(1, 5);
                let ids: Vec<i64> = (0..k).map(|_| self.pick_id(r).0).collect();
                r.s("id IN ");
                r.int_list(&ids);
            }
            4 => {
                let k = r.n(1, 4);
                let ids: Vec<i64> = (0..k).map(|_| self.pick_id(r).0).collect();
                r.s("id ");
                r.any(&ids);
            }
            5 => {
                let (a, _) = self.pick_id(r);
                let (b, _) = self.pick_id(r);
                r.s("id BETWEEN ");
                r.int(a.min(b));
                r.s(" AND ");
                r.int(a.max(b));
            }
            _ => {
                let op = *r.pick(&["<", ">", "<=", ">="]);
                let (id, _) = self.pick_id(r);
                r.s(&format!("id {op} "));
                r.int(id);
            }
        }
    }

    fn order_no_atom(&self, r: &mut R) {
        match r.n(0, 3) {
            0 if !self.pool.is_empty() => {
                let k = self.pick_known(r);
                let no = self.pool[k].order_no.clone();
                r.s("order_no = ");
                r.text(&no);
            }
            1 => {
                r.s("order_no LIKE ");
                let pat = *r.pick(&["L%", "I%", "%-0001%", "%~"]);
                r.text(pat);
            }
            _ => {
                let op = *r.pick(&["<", ">", ">="]);
                r.s(&format!("order_no {op} "));
                let v = format!("{}{}", r.pick(&["I", "L"]), r.n(0, 99_999));
                r.text(&v);
            }
        }
    }

    fn amount_atom(&self, r: &mut R) {
        match r.n(0, 6) {
            0 => r.s("order_amount IS NULL"),
            1 => r.s("order_amount IS NOT NULL"),
            2 => {
                let a = self.amount_lit(r);
                let b = self.amount_lit(r);
                let (a, b) = if a.parse::<f64>().unwrap_or(0.0) <= b.parse::<f64>().unwrap_or(0.0) { (a, b) } else { (b, a) };
                r.s("order_amount BETWEEN ");
                r.num(&a);
                r.s(" AND ");
                r.num(&b);
            }
            _ => {
                let op = *r.pick(&["<", ">", "<=", ">=", "=", "<>"]);
                r.s(&format!("order_amount {op} "));
                let a = self.amount_lit(r);
                r.num(&a);
            }
        }
    }

    fn status_atom(&self, r: &mut R) {
        match r.n(0, 6) {
            0 => r.s("pay_status IS NULL"),
            1 => r.s("pay_status IS NOT NULL"),
            2 => {
                r.s("pay_status IN (");
                let k = r.n(1, 3);
                for i in 0..k {
                    if i > 0 {
                        r.s(", ");
                    }
                    let s = self.status(r);
                    r.text(s);
                }
                r.s(")");
            }
            3 => {
                r.s("pay_status <> ");
                let s = self.status(r);
                r.text(s);
            }
            4 => r.s("pay_status LIKE 'P%'"),
            _ => {
                r.s("pay_status = ");
                let s = self.status(r);
                r.text(s);
            }
        }
    }

    fn time_atom(&self, r: &mut R) {
        match r.n(0, 11) {
            11 => {
                // timestamp without time zone and date values: the offset is ignored,
                // the value is read in the session TimeZone
                let t = if r.p(0.5) {
                    // the last evening of a month, where an offset read wrongly changes the month
                    let (y, m) = *r.pick(&MONTHS);
                    Ts::new(y, m, days_in_month(y, m), *r.pick(&[20, 22, 23]), 0, 0, 0, Some(0))
                } else {
                    self.pred_ts(r)
                };
                let d = format!("{:04}-{:02}-{:02}", t.y, t.m, t.d);
                let op = *r.pick(&["<", ">=", ">"]);
                match r.n(0, 3) {
                    0 => r.s(&format!("create_time {op} TIMESTAMP '{d} {:02}:{:02}:{:02}-10'", t.h, t.mi, t.s)),
                    1 => r.s(&format!("create_time {op} '{d} {:02}:{:02}:{:02}+05'::timestamp", t.h, t.mi, t.s)),
                    2 => r.s(&format!("create_time {op} '{d} 20:00:00-10'::date")),
                    _ => r.s(&format!("create_time {op} DATE '{d}'")),
                }
            }
            10 => {
                // functions of the column (never narrow the months)
                let (y, m) = *r.pick(&MONTHS);
                match r.n(0, 2) {
                    0 => r.s(&format!("date_trunc('month', create_time) = '{y:04}-{m:02}-01 00:00:00+00'")),
                    1 => r.s(&format!("create_time::date = '{y:04}-{m:02}-{:02}'", days_in_month(y, m))),
                    _ => r.s(&format!("extract(year from create_time) = {y}")),
                }
            }
            0..=4 => {
                let op = *r.pick(&["=", "<", "<=", ">", ">="]);
                r.s(&format!("create_time {op} "));
                let t = self.pred_ts(r);
                r.ts(&t);
            }
            5..=6 => {
                let (a, b) = self.ts_range(r);
                r.s("create_time BETWEEN ");
                r.ts(&a);
                r.s(" AND ");
                r.ts(&b);
            }
            7 => {
                let a = self.pred_ts(r);
                let b = self.pred_ts(r);
                r.s("create_time IN (");
                r.ts(&a);
                r.s(", ");
                r.ts(&b);
                r.s(")");
            }
            _ => {
                let (a, b) = self.ts_range(r);
                r.s("create_time >= ");
                r.ts(&a);
                r.s(" AND create_time < ");
                r.ts(&b);
            }
        }
    }

    fn atom(&self, r: &mut R) {
        match r.n(0, 99) {
            0..=29 => self.merchant_atom(r),
            30..=44 => self.id_atom(r),
            45..=49 => self.order_no_atom(r),
            50..=64 => self.amount_atom(r),
            65..=74 => self.status_atom(r),
            _ => self.time_atom(r),
        }
    }

    fn cond(&self, r: &mut R, depth: u32) {
        if depth == 0 || r.p(0.5) {
            self.atom(r);
            return;
        }
        match r.n(0, 4) {
            0..=1 => {
                r.s("(");
                self.cond(r, depth - 1);
                r.s(" AND ");
                self.cond(r, depth - 1);
                r.s(")");
            }
            2..=3 => {
                r.s("(");
                self.cond(r, depth - 1);
                r.s(" OR ");
                self.cond(r, depth - 1);
                r.s(")");
            }
            _ => {
                r.s("NOT (");
                self.cond(r, depth - 1);
                r.s(")");
            }
        }
    }

    /// ` WHERE …` (or nothing).
    fn where_clause(&self, r: &mut R) {
        match r.n(0, 99) {
            0..=34 => {
                r.s(" WHERE merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
                if r.p(0.6) {
                    r.s(" AND ");
                    self.cond(r, 1);
                }
            }
            35..=49 => {
                r.s(" WHERE ");
                self.merchant_atom(r);
                if r.p(0.5) {
                    r.s(" AND ");
                    self.cond(r, 1);
                }
            }
            50..=59 => {
                let (a, b) = self.ts_range(r);
                r.s(" WHERE create_time >= ");
                r.ts(&a);
                r.s(" AND create_time < ");
                r.ts(&b);
                if r.p(0.4) {
                    r.s(" AND ");
                    self.cond(r, 1);
                }
            }
            60..=69 => {}
            _ => {
                r.s(" WHERE ");
                self.cond(r, 2);
            }
        }
    }

    /// `t_order` as it is usually written, sometimes spelled otherwise (schema-qualified,
    /// upper case, quoted, with an alias) and sometimes after a comment. Returns
    /// (prefix comment, table text, label or "").
    fn table(&self, r: &mut R, alias_ok: bool) -> (&'static str, &'static str, &'static str) {
        let comment = match r.n(0, 39) {
            0 => "/* app: list */ ",
            1 => "-- app\n",
            _ => "",
        };
        let (t, label) = match r.n(0, 31) {
            0 => ("public.t_order", "public.t_order"),
            1 => ("T_ORDER", "T_ORDER"),
            2 => ("\"t_order\"", "quoted"),
            3 if alias_ok => ("t_order AS o", "alias"),
            4 if alias_ok => ("t_order o", "alias"),
            5 => ("ONLY t_order", "ONLY"),
            _ => ("t_order", ""),
        };
        (comment, t, label)
    }

    // ---- SELECT ----

    fn sel_point(&self, r: &mut R) -> (String, bool) {
        let (id, k) = self.pick_id(r);
        let label = self.id_label(id, k);
        let row_merchant = k.map(|k| self.pool[k].merchant);
        match r.n(0, 9) {
            0..=2 => {
                let (comment, table, tl) = self.table(r, true);
                r.s(&format!("{comment}SELECT * FROM {table} WHERE id = "));
                r.int(id);
                (format!("point/id= [{label}{}{tl}]", if tl.is_empty() { "" } else { ", " }), false)
            }
            3..=4 => {
                let m = match row_merchant {
                    Some(m) if r.p(0.85) => m,
                    _ => self.merchant(r),
                };
                r.s("SELECT * FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND id = ");
                r.int(id);
                (format!("point/merchant+id [{label}]"), false)
            }
            5 => {
                let mut ids = vec![id];
                for _ in 0..r.n(1, 4) {
                    ids.push(self.pick_id(r).0);
                }
                r.s("SELECT id, order_no, merchant_id FROM t_order WHERE id IN ");
                r.int_list(&ids);
                r.s(" ORDER BY id");
                (format!("point/id-in [{label}]"), true)
            }
            6 => {
                let mut ids = vec![id];
                for _ in 0..r.n(0, 3) {
                    ids.push(self.pick_id(r).0);
                }
                r.s("SELECT * FROM t_order WHERE id ");
                r.any(&ids);
                (format!("point/id-any [{label}]"), false)
            }
            7 => {
                let t = k.map(|k| self.pool[k].ts.clone()).unwrap_or_else(|| self.pred_ts(r));
                r.s("SELECT order_no, create_time FROM t_order WHERE id = ");
                r.int(id);
                r.s(" AND create_time = ");
                r.ts(&t);
                (format!("point/id+time [{label}]"), false)
            }
            8 => {
                r.s("SELECT count(*) FROM t_order WHERE id BETWEEN ");
                r.int(id);
                r.s(" AND ");
                let hi = id.saturating_add(r.n(0, 5000));
                r.int(hi);
                (format!("point/id-between [{label}]"), false)
            }
            _ => {
                let m = row_merchant.unwrap_or_else(|| self.merchant(r));
                let m2 = self.merchant(r);
                let (id2, _) = self.pick_id(r);
                r.s("SELECT id, pay_status FROM t_order WHERE merchant_id IN ");
                r.int_list(&[m, m2]);
                r.s(" AND id IN ");
                r.int_list(&[id, id2]);
                r.s(" ORDER BY id");
                (format!("point/merchant-in+id-in [{label}]"), true)
            }
        }
    }

    fn select_list(&self, r: &mut R) -> String {
        match r.n(0, 5) {
            0..=1 => "*".into(),
            2 => "id, order_no".into(),
            3 => "order_no, merchant_id, order_amount".into(),
            4 => "id, create_time, pay_status".into(),
            _ => {
                let mut cols = vec!["id", "order_no", "merchant_id", "order_amount", "pay_status", "create_time"];
                let k = r.n(1, 6) as usize;
                let mut out = Vec::new();
                for _ in 0..k {
                    let i = r.rng.gen_range(0..cols.len());
                    let c = cols.remove(i);
                    out.push(if r.p(0.15) { format!("{c} AS c_{c}") } else { c.to_string() });
                }
                out.join(", ")
            }
        }
    }

    /// ` ORDER BY k…, id` (the order then is the answer).
    fn order_by_id(&self, r: &mut R) {
        r.s(" ORDER BY ");
        for _ in 0..r.n(0, 2) {
            let (c, nullable) = *r.pick(&[("merchant_id", false), ("create_time", false), ("order_amount", true), ("pay_status", true), ("order_no", false)]);
            let dir = *r.pick(&["", " ASC", " DESC"]);
            let nulls = if nullable { *r.pick(&["", " NULLS FIRST", " NULLS LAST"]) } else { "" };
            r.s(&format!("{c}{dir}{nulls}, "));
        }
        let dir = *r.pick(&["", " DESC", " ASC"]);
        r.s(&format!("id{dir}"));
    }

    fn limit(&self, r: &mut R, offset: bool) {
        r.s(" LIMIT ");
        let n = r.n(0, 25);
        r.int(n);
        if offset && r.p(0.5) {
            r.s(" OFFSET ");
            let o = r.n(0, 40);
            r.int(o);
        }
    }

    fn sel_scan(&self, r: &mut R) -> (String, bool) {
        let list = self.select_list(r);
        let (comment, table, label) = self.table(r, true);
        r.s(&format!("{comment}SELECT {list} FROM {table}"));
        let from = r.mark();
        self.where_clause(r);
        let label = if label.is_empty() && !comment.is_empty() { "comment" } else { label };
        let qualified = r.p(0.1);
        let label = if qualified {
            if label == "alias" {
                "alias, qualified"
            } else if label.is_empty() {
                "qualified"
            } else {
                label
            }
        } else {
            label
        };
        let label = if label.is_empty() { String::new() } else { format!(" [{label}]") };
        let out = match r.n(0, 19) {
            0..=7 => (format!("scan{label}"), false),
            8..=13 => {
                self.order_by_id(r);
                (format!("scan/order{label}"), true)
            }
            14..=18 => {
                self.order_by_id(r);
                self.limit(r, true);
                (format!("scan/order-limit{label}"), true)
            }
            _ => {
                r.s(" ORDER BY id OFFSET ");
                let o = r.n(0, 300);
                r.int(o);
                (format!("scan/order-offset{label}"), true)
            }
        };
        if qualified {
            let prefix = if table.contains(" o") { "o." } else { "t_order." };
            r.qualify(from, prefix);
        }
        out
    }

    /// An aggregate call and whether it is count(DISTINCT …)/other/plain.
    fn aggregate(&self, r: &mut R) -> (String, &'static str) {
        let plain = [
            "count(*)",
            "count(order_amount)",
            "count(pay_status)",
            "count(id)",
            "sum(order_amount)",
            "avg(order_amount)",
            "min(order_amount)",
            "max(order_amount)",
            "min(create_time)",
            "max(create_time)",
            "min(order_no)",
            "max(order_no)",
            "min(id)",
            "max(id)",
            "sum(merchant_id)",
            "avg(merchant_id)",
            "sum(id)",
            "max(pay_status)",
            "min(merchant_id)",
            "avg(id)",
            "count(1)",
            "max(create_time)",
        ];
        match r.n(0, 99) {
            0..=84 => (r.pick(&plain).to_string(), "plain"),
            85..=93 => (
                r.pick(&["count(DISTINCT merchant_id)", "count(DISTINCT pay_status)", "sum(DISTINCT order_amount)", "count(DISTINCT order_amount)"])
                    .to_string(),
                "count-distinct",
            ),
            _ => (
                r.pick(&[
                    "bool_or(order_amount > 100)",
                    "count(*) FILTER (WHERE pay_status = 'PAID')",
                    "sum(order_amount) * 2",
                    "max(order_amount) - min(order_amount)",
                    "every(pay_status IS NOT NULL)",
                ])
                .to_string(),
                "other",
            ),
        }
    }

    fn sel_agg(&self, r: &mut R) -> (String, bool) {
        let k = r.n(1, 4);
        let mut items = Vec::new();
        let mut tag = "plain";
        for i in 0..k {
            let (a, t) = self.aggregate(r);
            if t != "plain" {
                tag = t;
            }
            items.push(if r.p(0.3) { format!("{a} AS a{i}") } else { a });
        }
        if r.p(0.04) {
            // a constant select list ordered by an aggregate: still one row (an aggregate query)
            let c = *r.pick(&["'x'", "'all' AS label", "1 AS one"]);
            r.s(&format!("SELECT {c} FROM t_order"));
            self.where_clause(r);
            let o = *r.pick(&["count(*)", "sum(order_amount)", "max(id) DESC"]);
            r.s(&format!(" ORDER BY {o}"));
            return ("agg/constant-order-by-agg".into(), false);
        }
        r.s(&format!("SELECT {} FROM t_order", items.join(", ")));
        let from = r.mark();
        self.where_clause(r);
        if r.p(0.08) {
            r.qualify(from, "t_order.");
            return (format!("agg/{tag} [qualified]"), false);
        }
        (format!("agg/{tag}"), false)
    }

    /// A numeric literal spelled one of the ways PostgreSQL accepts.
    fn num_spelling(&self, r: &mut R, base: &str) -> String {
        match r.n(0, 11) {
            0 => format!("{base}::numeric"),
            1 => format!("'{base}'"),
            2 => format!("CAST({base} AS numeric)"),
            3 => format!("{base}e0"),
            4 => format!("+{base}"),
            5 if base.contains('.') => format!("{base}000"),
            6 if base.contains('.') => base.trim_end_matches('0').trim_end_matches('.').to_string(),
            7 if !base.starts_with('-') => {
                // scientific notation, exactly the same value
                let v: f64 = base.parse().unwrap_or(0.0);
                if v >= 10.0 && base.ends_with('0') && !base.contains('.') {
                    format!("{}e1", &base[..base.len() - 1])
                } else {
                    format!("{base}E+0")
                }
            }
            _ => base.to_string(),
        }
    }

    /// An amount for a HAVING comparison: from the data (so `=` can hold), or made up.
    fn having_amount(&self, r: &mut R) -> String {
        if !self.pool.is_empty() && r.p(0.4) {
            let k = self.pick_known(r);
            if let Some(a) = &self.pool[k].amount {
                return a.clone();
            }
        }
        match r.n(0, 9) {
            0 => format!("{}.50", r.n(0, 3000)),
            1 => format!("{}.25", r.n(0, 600)),
            2 => r.n(0, 3000).to_string(),
            3 => format!("-{}.5", r.n(0, 50)),
            4 => "99999999999999999999.99".to_string(),
            5 => format!("{}.{:03}", r.n(0, 999), r.n(0, 999)),
            6 => "0".to_string(),
            _ => format!("{}.{:02}", r.n(0, 999), r.n(0, 99)),
        }
    }

    /// A HAVING condition; true when it compares with a numeric literal.
    fn having_atom(&self, r: &mut R, keys: &[(&str, &str)]) -> bool {
        match r.n(0, 16) {
            0..=1 => {
                let op = *r.pick(&[">", ">=", "<", "=", "<>"]);
                r.s(&format!("count(*) {op} "));
                let n = r.n(0, 12);
                r.int(n);
                false
            }
            2 => {
                r.s("count(*) BETWEEN ");
                let a = r.n(1, 5);
                r.int(a);
                r.s(" AND ");
                let b = a + r.n(0, 10);
                r.int(b);
                false
            }
            3..=5 => {
                let f = *r.pick(&["sum(order_amount)", "avg(order_amount)", "max(order_amount)", "min(order_amount)"]);
                let op = *r.pick(&[">", "<", ">=", "<=", "=", "<>"]);
                let v = self.having_amount(r);
                let v = self.num_spelling(r, &v);
                if r.p(0.2) {
                    // literal on the left
                    let flipped = match op {
                        ">" => "<",
                        "<" => ">",
                        ">=" => "<=",
                        "<=" => ">=",
                        o => o,
                    };
                    r.num(&v);
                    r.s(&format!(" {flipped} {f}"));
                } else {
                    r.s(&format!("{f} {op} "));
                    r.num(&v);
                }
                true
            }
            6 | 16 => {
                // count compared with a numeric literal
                let op = *r.pick(&[">", ">=", "<", "="]);
                let v = *r.pick(&["1.5", "2.0", "'2'", "2.5", "0.5", "1e0", "3.00"]);
                r.s(&format!("count(*) {op} "));
                r.num(v);
                true
            }
            7 => {
                let f = *r.pick(&["min(create_time)", "max(create_time)"]);
                let op = *r.pick(&["<", ">="]);
                r.s(&format!("{f} {op} "));
                let t = self.pred_ts(r);
                r.ts(&t);
                false
            }
            8 => {
                let t =
                    *r.pick(&["sum(order_amount) IS NULL", "count(order_amount) < count(*)", "max(pay_status) IS NOT NULL", "min(order_no) < max(order_no)"]);
                r.s(t);
                false
            }
            9 => {
                r.s("max(id) > ");
                let (id, _) = self.pick_id(r);
                r.int(id);
                false
            }
            10 => {
                let t = *r.pick(&[
                    "avg(order_amount) > 2 * min(order_amount)",
                    "sum(order_amount) > 2 * 100.25",
                    "count(*) + 1 > 3",
                    "sum(order_amount) / count(*) > 100",
                    "max(order_amount) - min(order_amount) > 50.5",
                    "count(*) >= sum(merchant_id)",
                    "sum(merchant_id) > count(*)",
                    "max(merchant_id) > avg(merchant_id)",
                    "count(order_amount) = count(*)",
                    "10 > 9",
                    "1 = 1.0",
                    "true",
                ]);
                r.s(t);
                true
            }
            11 => {
                // a group key in HAVING
                let (e, _) = *r.pick(keys);
                if e == "merchant_id" {
                    r.s("merchant_id > ");
                    let m = self.merchant(r);
                    r.int(m);
                } else {
                    r.s(&format!("{e} IS NOT NULL"));
                }
                false
            }
            12 => {
                r.s("count(DISTINCT pay_status) > ");
                let n = r.n(0, 3);
                r.int(n);
                false
            }
            13 => {
                r.s("sum(order_amount) IS NOT NULL AND sum(order_amount) > ");
                let v = self.having_amount(r);
                r.num(&v);
                true
            }
            _ => {
                let f = *r.pick(&["sum(merchant_id)", "avg(merchant_id)", "max(merchant_id)"]);
                let op = *r.pick(&[">", "<", "="]);
                let v = *r.pick(&["10", "10.5", "20.0", "-3", "5e0"]);
                r.s(&format!("{f} {op} "));
                r.num(v);
                true
            }
        }
    }

    fn sel_group(&self, r: &mut R) -> (String, bool) {
        let all_keys: [(&str, &str); 5] = [
            ("pay_status", "pay_status"),
            ("merchant_id", "merchant_id"),
            ("date_trunc('month', create_time)", "m"),
            ("merchant_id % 4", "mod4"),
            ("order_amount IS NULL", "no_amount"),
        ];
        let nkeys = match r.n(0, 9) {
            0..=5 => 1,
            6..=8 => 2,
            _ => 3,
        };
        let mut keys: Vec<(&str, &str)> = Vec::new();
        while keys.len() < nkeys {
            let k = *r.pick(&all_keys);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let mut tag = Vec::new();
        let distinct = r.p(0.2);
        // which keys are selected: all (usually), a subset, or none
        let selected: Vec<usize> = match r.n(0, 9) {
            0 => Vec::new(),
            1..=3 if nkeys > 1 => {
                tag.push("key-subset");
                let keep = r.rng.gen_range(0..nkeys);
                vec![keep]
            }
            _ => (0..nkeys).collect(),
        };
        let all_selected = selected.len() == nkeys;
        let mut items: Vec<String> = Vec::new();
        for &i in &selected {
            let (e, alias) = keys[i];
            items.push(if e == alias { e.to_string() } else { format!("{e} AS {alias}") });
        }
        let nagg = r.n(if selected.is_empty() { 1 } else { 0 }, 3);
        let mut agg_aliases = Vec::new();
        for i in 0..nagg {
            let (a, t) = self.aggregate(r);
            if t != "plain" {
                tag.push(t);
            }
            let alias = format!("a{i}");
            items.push(format!("{a} AS {alias}"));
            agg_aliases.push(alias);
        }
        r.s(&format!("SELECT {}{} FROM t_order", if distinct { "DISTINCT " } else { "" }, items.join(", ")));
        self.where_clause(r);
        let by_ordinal = all_selected && r.p(0.3);
        let group: Vec<String> = keys.iter().enumerate().map(|(i, (e, _))| if by_ordinal { (i + 1).to_string() } else { e.to_string() }).collect();
        r.s(&format!(" GROUP BY {}", group.join(", ")));
        if r.p(0.45) {
            r.s(" HAVING ");
            let mut num = self.having_atom(r, &keys);
            if r.p(0.3) {
                let t = if r.p(0.5) { " AND " } else { " OR " };
                r.s(t);
                num |= self.having_atom(r, &keys);
            }
            tag.push(if num { "having-num" } else { "having" });
        }
        if distinct {
            tag.push("select-distinct");
        }
        if all_selected && !selected.is_empty() && r.p(0.5) {
            let mut order = Vec::new();
            if !agg_aliases.is_empty() && r.p(0.3) {
                order.push(format!("{}{}", r.pick(&agg_aliases), r.pick(&["", " DESC"])));
            } else if !distinct && r.p(0.15) {
                // an aggregate that is not selected
                order.push(format!("{}{}", r.pick(&["sum(order_amount)", "count(*)", "max(create_time)"]), r.pick(&["", " DESC NULLS LAST"])));
                tag.push("order-hidden-agg");
            }
            for (i, (e, alias)) in keys.iter().enumerate() {
                let name = match r.n(0, 2) {
                    0 => e.to_string(),
                    1 => alias.to_string(),
                    _ => (i + 1).to_string(),
                };
                order.push(format!("{name}{}{}", r.pick(&["", " DESC"]), r.pick(&["", " NULLS FIRST", " NULLS LAST"])));
            }
            r.s(&format!(" ORDER BY {}", order.join(", ")));
            tag.push("order");
            if r.p(0.4) {
                self.limit(r, true);
                tag.push("limit");
            }
        }
        let t = if tag.is_empty() { String::new() } else { format!("/{}", tag.join("+")) };
        (format!("group{t}"), false)
    }

    fn sel_distinct(&self, r: &mut R) -> (String, bool) {
        let all: [(&str, &str); 5] = [
            ("merchant_id", "merchant_id"),
            ("pay_status", "pay_status"),
            ("date_trunc('month', create_time) AS m", "m"),
            ("order_amount", "order_amount"),
            ("merchant_id % 8 AS s", "s"),
        ];
        let k = r.n(1, 2) as usize;
        let mut cols: Vec<(&str, &str)> = Vec::new();
        while cols.len() < k {
            let c = *r.pick(&all);
            if !cols.contains(&c) {
                cols.push(c);
            }
        }
        r.s(&format!("SELECT DISTINCT {} FROM t_order", cols.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")));
        self.where_clause(r);
        let mut shape = "distinct".to_string();
        if r.p(0.4) {
            let order: Vec<String> = cols.iter().map(|c| format!("{}{}", c.1, r.pick(&["", " DESC", " NULLS FIRST"]))).collect();
            r.s(&format!(" ORDER BY {}", order.join(", ")));
            shape.push_str("/order");
            if r.p(0.5) {
                self.limit(r, true);
                shape.push_str("-limit");
            }
        }
        (shape, false)
    }

    /// Derived tables, CTEs, UNION, subqueries, self-joins.
    fn sel_nested(&self, r: &mut R) -> (String, bool) {
        let m = self.merchant(r);
        match r.n(0, 16) {
            14 => {
                // what SQLAlchemy's Query.count() sends
                r.s("SELECT count(*) AS count_1 FROM (SELECT t_order.id AS t_order_id, t_order.order_no AS t_order_order_no FROM t_order WHERE t_order.merchant_id = ");
                r.int(m);
                r.s(") AS anon_1");
                ("derived/sqlalchemy-count".into(), false)
            }
            15 => {
                // a column alias list renames the columns: merchant_id here is the table's id
                let (id, _) = self.pick_id(r);
                r.s("SELECT * FROM t_order AS t(merchant_id, order_no, id) WHERE merchant_id = ");
                r.int(id);
                ("alias/column-rename".into(), false)
            }
            16 => {
                // two merchants of one shard, one in a subquery
                r.s("SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND id IN (SELECT id FROM t_order o WHERE o.merchant_id = ");
                r.int(m + 8);
                r.s(") ORDER BY id");
                ("subquery/in-same-shard-other-merchant".into(), true)
            }
            0 => {
                r.s("SELECT count(*), sum(order_amount) FROM (SELECT * FROM t_order WHERE merchant_id = ");
                r.int(m);
                if r.p(0.5) {
                    r.s(" AND ");
                    self.cond(r, 1);
                }
                r.s(") s");
                ("derived/one-merchant".into(), false)
            }
            1 => {
                r.s("SELECT s.pay_status, count(*) FROM (SELECT pay_status, order_amount FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(") s GROUP BY s.pay_status");
                ("derived/one-merchant+group".into(), false)
            }
            2 => {
                r.s("SELECT * FROM (SELECT id, order_no, create_time FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" ORDER BY id LIMIT ");
                let n = r.n(1, 8);
                r.int(n);
                r.s(") s ORDER BY id");
                ("derived/one-merchant+limit".into(), true)
            }
            3 => {
                r.s("WITH x AS (SELECT * FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(") SELECT count(*) FROM x");
                ("cte/one-merchant".into(), false)
            }
            4 => {
                r.s("WITH x AS (SELECT id, order_amount FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND ");
                self.cond(r, 1);
                r.s(") SELECT max(order_amount), count(*) FROM x");
                ("cte/one-merchant+pred".into(), false)
            }
            5 => {
                r.s("SELECT count(*) FROM (SELECT * FROM t_order WHERE ");
                self.status_atom(r);
                r.s(") s");
                ("derived/cross-shard".into(), false)
            }
            6 => {
                r.s("SELECT count(*) FROM (SELECT * FROM t_order) s WHERE s.merchant_id = ");
                r.int(m);
                ("derived/outer-predicate".into(), false)
            }
            7 => {
                let same = r.p(0.6);
                let m2 = if same { m + 8 } else { m + 1 };
                r.s("SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" UNION ALL SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m2);
                (if same { "union/same-shard" } else { "union/cross-shard" }.into(), false)
            }
            8 => {
                r.s("SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND order_amount > (SELECT avg(order_amount) FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(")");
                ("subquery/scalar-same-merchant".into(), false)
            }
            9 => {
                r.s("SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND id IN (SELECT id FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND ");
                self.status_atom(r);
                r.s(")");
                ("subquery/in-same-merchant".into(), false)
            }
            10 => {
                r.s("SELECT a.id, b.order_no FROM t_order a JOIN t_order b ON a.id = b.id WHERE a.merchant_id = ");
                r.int(m);
                r.s(" AND b.merchant_id = ");
                r.int(m);
                ("join/self-same-merchant".into(), false)
            }
            11 => {
                r.s("WITH x AS (SELECT merchant_id, order_amount FROM t_order WHERE merchant_id IN ");
                r.int_list(&[m, m + 8]);
                r.s(") SELECT merchant_id, sum(order_amount), count(*) FROM x GROUP BY merchant_id");
                ("cte/same-shard-merchants+group".into(), false)
            }
            12 => {
                r.s("WITH x AS (SELECT * FROM t_order WHERE ");
                self.time_atom(r);
                r.s(") SELECT count(*) FROM x");
                ("cte/cross-shard".into(), false)
            }
            _ => {
                r.s("SELECT count(*) FROM t_order WHERE merchant_id = ");
                r.int(m);
                r.s(" AND EXISTS (SELECT 1 FROM t_order o2 WHERE o2.merchant_id = ");
                r.int(m);
                r.s(" AND o2.order_amount > t_order.order_amount)");
                ("subquery/exists-correlated".into(), false)
            }
        }
    }

    fn sel_expr(&self, r: &mut R) -> (String, bool) {
        let exprs = [
            "order_amount * 2 AS dbl",
            "upper(pay_status) AS st",
            "coalesce(pay_status, 'none') AS ps",
            "date_trunc('day', create_time) AS d",
            "length(order_no) AS len",
            "merchant_id % 8 AS shard",
            "order_amount IS NULL AS na",
            "extract(month from create_time) AS mon",
            "to_char(create_time, 'YYYY-MM') AS ym",
            "create_time + interval '1 hour' AS later",
            "-order_amount AS neg",
            "CASE WHEN order_amount > 100 THEN 'big' ELSE 'small' END AS size",
            "- -order_amount AS amt",
            "-(-order_amount) AS amt2",
            "round(order_amount / 3, 4) AS third",
        ];
        let k = r.n(1, 3);
        let items: Vec<&str> = (0..k).map(|_| *r.pick(&exprs)).collect();
        r.s(&format!("SELECT id, {} FROM t_order", items.join(", ")));
        self.where_clause(r);
        if r.p(0.5) {
            r.s(" ORDER BY id");
            if r.p(0.4) {
                self.limit(r, true);
            }
            ("expr/order".into(), true)
        } else {
            ("expr".into(), false)
        }
    }

    /// Statements that fail on one table (the same SQLSTATE is expected).
    fn error_stmt(&mut self, r: &mut R) -> (Kind, String) {
        let m = self.merchant(r);
        match r.n(0, 5) {
            0 => {
                r.s("SELECT * FROM t_order WHERE merchant_id = 'abc'");
                (Kind::Select, "error/bad-literal".into())
            }
            1 => {
                r.s("SELECT nocol FROM t_order WHERE merchant_id = ");
                r.int(m);
                (Kind::Select, "error/no-column".into())
            }
            2 => {
                r.s("SELECT order_amount / 0 FROM t_order WHERE merchant_id = ");
                r.int(m);
                (Kind::Select, "error/div0-one-merchant".into())
            }
            3 => {
                r.s("SELECT id::int FROM t_order");
                if r.p(0.5) {
                    r.s(" WHERE merchant_id = ");
                    r.int(m);
                }
                (Kind::Select, "error/int4-overflow".into())
            }
            4 if !self.pool.is_empty() => {
                // the same row again (same id, merchant, time, order_no): a unique violation in
                // its own month table. (Only rows whose id is known: another id could collide
                // with a row of another month table, which a sharded table cannot detect.)
                let k = self.pick_known(r);
                let row = self.pool[k].clone();
                match row.id {
                    Some(id) => {
                        r.s(&format!(
                            "INSERT INTO t_order (id, order_no, merchant_id, order_amount, pay_status, create_time) VALUES ({id}, {}, {}, 1.00, 'NEW', {})",
                            quote(&row.order_no),
                            row.merchant,
                            row.ts.literal()
                        ));
                        (Kind::Insert, "error/duplicate-row".into())
                    }
                    None => {
                        r.s("SELECT nocol FROM t_order");
                        (Kind::Select, "error/no-column".into())
                    }
                }
            }
            _ => {
                let t = self.data_ts(r);
                let no = self.order_no("E");
                let id = self.fresh_id(r, 1, &t);
                r.s(&format!("INSERT INTO t_order (id, order_no, create_time) VALUES ({id}, {}, {})", quote(&no), t.literal()));
                (Kind::Insert, "error/insert-without-merchant".into())
            }
        }
    }

    // ---- DML ----

    fn insert_spec(&mut self, r: &mut R, nrows: usize, mode: IdMode, prefix: &str) -> InsertSpec {
        let mut cols: Vec<&'static str> = vec!["order_no", "merchant_id", "order_amount", "pay_status", "create_time"];
        if r.p(0.15) {
            let drop = *r.pick(&["order_amount", "pay_status"]);
            cols.retain(|c| *c != drop);
        }
        if mode != IdMode::Generated {
            cols.insert(0, "id");
        }
        if r.p(0.2) {
            // another column order
            for i in (1..cols.len()).rev() {
                let j = r.rng.gen_range(0..=i);
                cols.swap(i, j);
            }
        }
        let mut rows = Vec::new();
        for _ in 0..nrows {
            let merchant = self.data_merchant(r);
            let ts = self.data_ts(r);
            let no = self.order_no(prefix);
            let id = match mode {
                IdMode::Generated => None,
                IdMode::SomeDefault if r.p(0.5) => None,
                _ => Some(self.fresh_id(r, merchant, &ts)),
            };
            let mut cells = Vec::new();
            let mut amount = None;
            for c in &cols {
                cells.push(match *c {
                    "id" => match id {
                        Some(v) => val_int(r, v),
                        None => Cell::NoId,
                    },
                    "order_no" => {
                        let p = r.as_param();
                        Cell::Val(quote(&no), p.then(|| Param::Text(no.clone())))
                    }
                    "merchant_id" if !self.plain && r.p(0.03) => Cell::Val(format!("'{merchant}'"), None),
                    "merchant_id" => val_int(r, merchant),
                    "order_amount" => {
                        if r.p(0.08) {
                            Cell::Val("NULL".into(), None)
                        } else {
                            let a = self.amount(r);
                            amount = Some(a.clone());
                            Cell::Val(a, None)
                        }
                    }
                    "pay_status" => {
                        if r.p(0.08) {
                            Cell::Val("NULL".into(), None)
                        } else {
                            let s = self.status(r);
                            let p = r.as_param();
                            Cell::Val(quote(s), p.then(|| Param::Text(s.to_string())))
                        }
                    }
                    _ if !self.plain && r.p(0.03) => Cell::Val(format!("TIMESTAMPTZ {}", ts.literal()), None),
                    _ => {
                        let p = r.as_param() && ts.raw.is_none();
                        Cell::Val(ts.literal(), p.then(|| Param::Ts(ts.utc_micros())))
                    }
                });
            }
            self.by_order_no.insert(no.clone(), self.pool.len());
            self.pool.push(Known { id, merchant, order_no: no.clone(), ts, generated: id.is_none(), amount });
            rows.push((no, cells, id.is_none()));
        }
        InsertSpec { cols, rows, returning: None, on_conflict: None }
    }

    fn insert(&mut self, r: &mut R) -> (String, InsertSpec) {
        let nrows = match r.n(0, 9) {
            0..=3 => 1,
            4..=8 => r.n(2, 6) as usize,
            _ => r.n(7, 20) as usize,
        };
        let mode = match r.n(0, 19) {
            0..=4 => IdMode::Generated,
            5 => IdMode::SomeDefault,
            _ => IdMode::Explicit,
        };
        let mut spec = self.insert_spec(r, nrows, mode, "I");
        let generated = mode != IdMode::Explicit;
        spec.returning = if generated {
            Some(r.pick(&["id, order_no", "id, order_no, merchant_id, create_time", "*"]).to_string())
        } else if r.p(0.3) {
            Some(r.pick(&["id", "order_no, merchant_id", "*", "id, order_no, order_amount"]).to_string())
        } else {
            None
        };
        let mut shape = match mode {
            IdMode::Generated => "insert/generated-ids".to_string(),
            IdMode::SomeDefault => "insert/default-ids".to_string(),
            IdMode::Explicit => {
                let kinds: HashSet<&str> =
                    spec.rows.iter().filter_map(|(no, _, _)| self.by_order_no.get(no)).filter_map(|&i| self.pool[i].id).map(id_kind).collect();
                let mut kinds: Vec<&str> = kinds.into_iter().collect();
                kinds.sort();
                format!("insert/explicit-ids [{}]", kinds.join(","))
            }
        };
        if nrows > 1 {
            shape.push_str(" multi-row");
        }
        if mode == IdMode::Explicit && r.p(0.05) {
            spec.on_conflict = Some("(id) DO NOTHING".into());
            shape.push_str(" on-conflict");
        }
        (shape, spec)
    }

    /// ` WHERE …` of an UPDATE/DELETE and its label.
    fn dml_where(&self, r: &mut R, narrow: bool) -> &'static str {
        let roll = if narrow { r.n(0, 69) } else { r.n(0, 99) };
        match roll {
            0..=14 => {
                let (id, _) = self.pick_id(r);
                r.s(" WHERE id = ");
                r.int(id);
                "id="
            }
            15..=29 => {
                let (id, k) = self.pick_id(r);
                let m = match k {
                    Some(k) if r.p(0.85) => self.pool[k].merchant,
                    _ => self.merchant(r),
                };
                r.s(" WHERE merchant_id = ");
                r.int(m);
                r.s(" AND id = ");
                r.int(id);
                "merchant+id"
            }
            30..=39 => {
                let k = r.n(2, 5);
                let ids: Vec<i64> = (0..k).map(|_| self.pick_id(r).0).collect();
                r.s(" WHERE id IN ");
                r.int_list(&ids);
                "id-in"
            }
            40..=49 => {
                r.s(" WHERE merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
                r.s(" AND ");
                self.status_atom(r);
                "merchant+status"
            }
            50..=59 => {
                r.s(" WHERE merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
                r.s(" AND ");
                self.time_atom(r);
                "merchant+time"
            }
            60..=69 => {
                r.s(" WHERE merchant_id = ");
                let m = self.merchant(r);
                r.int(m);
                r.s(" AND ");
                self.cond(r, 2);
                "merchant+random"
            }
            70..=79 => {
                r.s(" WHERE ");
                self.time_atom(r);
                r.s(" AND ");
                self.status_atom(r);
                "time+status"
            }
            80..=97 => {
                r.s(" WHERE ");
                self.cond(r, 2);
                "random"
            }
            _ => "all",
        }
    }

    fn update(&self, r: &mut R) -> String {
        let (comment, table, label) = self.table(r, false);
        r.s(&format!("{comment}UPDATE {table} SET "));
        let bad = r.p(0.03);
        if bad {
            match r.n(0, 2) {
                0 => {
                    r.s("merchant_id = ");
                    let m = self.merchant(r);
                    r.int(m);
                }
                1 => {
                    r.s("create_time = ");
                    let t = self.data_ts(r);
                    r.ts(&t);
                }
                // the same value: one table always accepts it
                _ => r.s("id = id"),
            }
        } else {
            let k = r.n(1, 2);
            let mut used = Vec::new();
            for i in 0..k {
                let which = r.n(0, 7);
                let target = if which <= 3 {
                    "pay_status"
                } else if which <= 6 {
                    "order_amount"
                } else {
                    "order_no"
                };
                if used.contains(&target) {
                    continue;
                }
                used.push(target);
                if i > 0 {
                    r.s(", ");
                }
                match which {
                    0..=1 => {
                        r.s("pay_status = ");
                        let s = self.status(r);
                        r.text(s);
                    }
                    2 => r.s("pay_status = NULL"),
                    3 => r.s("pay_status = lower(pay_status)"),
                    4 => r.s("order_amount = order_amount + 1.25"),
                    5 => r.s("order_amount = round(order_amount * 1.1, 2)"),
                    6 => {
                        if r.p(0.5) {
                            r.s("order_amount = NULL");
                        } else {
                            let a = self.amount(r);
                            r.s("order_amount = ");
                            r.num(&a);
                        }
                    }
                    _ => r.s("order_no = order_no || '~'"),
                }
            }
        }
        let w = self.dml_where(r, false);
        let ret = r.p(0.25);
        if ret {
            let t = *r.pick(&["id, pay_status, order_amount", "*", "order_no", "id, order_amount * 2 AS dbl, upper(pay_status)"]);
            r.s(&format!(" RETURNING {t}"));
        }
        format!(
            "update/{}{}{}{}",
            if bad { "key-column " } else { "" },
            w,
            if ret { " returning" } else { "" },
            if label.is_empty() { String::new() } else { format!(" [{label}]") }
        )
    }

    fn delete(&self, r: &mut R) -> String {
        let (comment, table, label) = self.table(r, false);
        r.s(&format!("{comment}DELETE FROM {table}"));
        let narrow = r.p(0.8);
        let w = self.dml_where(r, narrow);
        if w == "all" {
            // keep the table: delete one merchant's rows instead
            r.s(" WHERE merchant_id = ");
            let m = self.merchant(r);
            r.int(m);
        }
        let ret = r.p(0.25);
        if ret {
            let t = *r.pick(&["id", "*"]);
            r.s(&format!(" RETURNING {t}"));
        }
        format!(
            "delete/{}{}{}",
            if w == "all" { "merchant" } else { w },
            if ret { " returning" } else { "" },
            if label.is_empty() { String::new() } else { format!(" [{label}]") }
        )
    }
}

fn val_int(r: &mut R, v: i64) -> Cell {
    let p = r.as_param();
    Cell::Val(v.to_string(), p.then_some(Param::Int(v)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdMode {
    Explicit,
    Generated,
    SomeDefault,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(days_from_civil(2000, 1, 1), PG_EPOCH_DAYS);
        assert_eq!(civil_from_days(days_from_civil(2026, 10, 31)), (2026, 10, 31));
        assert_eq!(days_in_month(2026, 2), 28);
        assert_eq!(days_in_month(2028, 2), 29);
        let t = Ts::new(2026, 11, 1, 0, 30, 0, 0, Some(60));
        assert_eq!(t.text(), "2026-11-01 00:30:00+01");
        assert_eq!(t.utc_month(), (2026, 10));
        assert_eq!(format_pg_micros(t.utc_micros()), "2026-10-31 23:30:00+00");
        let t = Ts::new(2026, 1, 1, 5, 30, 0, 0, Some(330));
        assert_eq!(t.text(), "2026-01-01 05:30:00+05:30");
        assert_eq!(format_pg_micros(t.utc_micros()), "2026-01-01 00:00:00+00");
    }

    #[test]
    fn deterministic() {
        let run = |seed| {
            let mut g = Gen::new(seed);
            let mut out: Vec<String> = g.initial_load(120).iter().map(|s| s.sql()).collect();
            for _ in 0..300 {
                let s = g.next_stmt();
                out.push(s.sql());
                out.push(format!("{:?}", s.render(true, &HashMap::new())));
            }
            out
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn ordered_statements_end_with_id() {
        let mut g = Gen::new(3);
        g.initial_load(100);
        for _ in 0..2000 {
            let s = g.next_stmt();
            if s.ordered && s.kind == Kind::Select {
                let sql = s.sql();
                assert!(sql.contains("ORDER BY"), "{sql}");
                let tail = &sql[sql.rfind("ORDER BY").unwrap_or(0)..];
                let before_limit = tail.split(" LIMIT ").next().unwrap_or(tail).split(" OFFSET ").next().unwrap_or(tail);
                assert!(
                    before_limit.trim_end().ends_with("id") || before_limit.trim_end().ends_with("id DESC") || before_limit.trim_end().ends_with("id ASC"),
                    "{sql}"
                );
            }
        }
    }
}
