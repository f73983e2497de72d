//! Combining the rows of several targets per a [`MergeSpec`]: rows as the
//! client would get them from one table. Pure: rows in, rows out.
//!
//! Aggregates (count/sum/avg) and helper columns arrive in text format (the
//! executor asks for that); every other column arrives in the client's format
//! and is passed through untouched, so only computed values are re-encoded.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use shardgate_router::{Agg, CmpOp, ColRef, Having, MergeSpec, Operand, SortKey};

use super::value::{self, decode, Acc, Key, ValueError};

/// One row: a value per column (`None` = NULL).
pub type Row = Vec<Option<Bytes>>;

/// A column as the targets return it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// Type OID.
    pub type_oid: u32,
    /// Binary format (else text).
    pub binary: bool,
}

/// Parses a DataRow body.
pub fn parse_data_row(body: &[u8]) -> Result<Row, ValueError> {
    crate::protocol::backend::data_row(body).ok_or(ValueError::Malformed("DataRow"))
}

/// Writes a DataRow of the first `n` values of `row`.
pub fn put_data_row(out: &mut BytesMut, row: &[Option<Bytes>], n: usize) {
    crate::protocol::codec::put_message(out, b'D', |o| {
        o.put_i16(n as i16);
        for v in row.iter().take(n) {
            match v {
                Some(b) => {
                    o.put_i32(b.len() as i32);
                    o.extend_from_slice(b);
                }
                None => o.put_i32(-1),
            }
        }
    });
}

/// Rewrites a DataRow frame keeping only its first `n` columns.
pub fn trim_data_row(out: &mut BytesMut, frame_body: &[u8], n: usize) -> Result<(), ValueError> {
    let mut pos = 2;
    for _ in 0..n {
        let len = frame_body.get(pos..pos + 4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(i32::from_be_bytes).ok_or(ValueError::Malformed("DataRow"))?;
        pos += 4 + len.max(0) as usize;
    }
    let cols = frame_body.get(2..pos).ok_or(ValueError::Malformed("DataRow"))?;
    crate::protocol::codec::put_message(out, b'D', |o| {
        o.put_i16(n as i16);
        o.extend_from_slice(cols);
    });
    Ok(())
}

/// Resolves a [`ColRef`] to an index into target rows.
pub fn index(c: ColRef, visible: usize) -> usize {
    match c {
        ColRef::Visible(i) => i,
        ColRef::Hidden(i) => visible + i,
    }
}

/// Compares two rows on the sort keys, PostgreSQL-style (NULLS LAST for ASC unless told).
pub fn compare_rows(a: &[Option<Key>], b: &[Option<Key>], keys: &[SortKey]) -> std::cmp::Ordering {
    use std::cmp::Ordering::*;
    for (i, k) in keys.iter().enumerate() {
        let ord = match (&a[i], &b[i]) {
            (None, None) => Equal,
            (None, Some(_)) => {
                if k.nulls_first {
                    Less
                } else {
                    Greater
                }
            }
            (Some(_), None) => {
                if k.nulls_first {
                    Greater
                } else {
                    Less
                }
            }
            (Some(x), Some(y)) => {
                let o = x.cmp(y);
                if k.descending {
                    o.reverse()
                } else {
                    o
                }
            }
        };
        if ord != Equal {
            return ord;
        }
    }
    Equal
}

/// Decodes the sort-key values of a row.
pub fn sort_keys(row: &Row, keys: &[SortKey], cols: &[Column], visible: usize) -> Result<Vec<Option<Key>>, ValueError> {
    keys.iter()
        .map(|k| {
            let i = index(k.col, visible);
            let c = cols.get(i).ok_or(ValueError::Malformed("sort column"))?;
            row.get(i).cloned().flatten().map(|v| decode(c.type_oid, c.binary, &v)).transpose()
        })
        .collect()
}

/// Checks up front that every sort key has a known order.
pub fn check_orderable(keys: &[SortKey], cols: &[Column], visible: usize) -> Result<(), ValueError> {
    for k in keys {
        let c = cols.get(index(k.col, visible)).ok_or(ValueError::Malformed("sort column"))?;
        if !value::orderable(c.type_oid) {
            return Err(ValueError::Unsupported(format!(
                "ORDER BY a column of type oid {} across shards is not supported; order by a number, text or time column, or add the shard key to WHERE",
                c.type_oid
            )));
        }
    }
    Ok(())
}

/// Re-groups, filters, de-duplicates and orders rows held in memory (the
/// spec needs all rows: GROUP BY or DISTINCT). `cap` bounds the groups kept.
pub struct Collector<'a> {
    spec: &'a MergeSpec,
    cols: Vec<Column>,
    visible: usize,
    cap: Caps,
    /// Bytes held (groups' rows and keys, distinct values), estimated.
    held: usize,
    groups: Vec<Group>,
    index: HashMap<Vec<Option<Key>>, usize>,
    /// Distinct values kept over all groups (bounded by `cap` too).
    distinct_values: usize,
}

struct Group {
    row: Row,
    accs: Vec<Acc>,
    /// Per DISTINCT aggregate: the values seen, their count and their sum.
    distinct: Vec<Distinct>,
}

#[derive(Default)]
struct Distinct {
    seen: std::collections::HashSet<Key>,
    count: i64,
    sum: Acc,
}

/// What one merge may hold in memory (`server.max_merge_rows`, `max_merge_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Rows, groups or distinct values.
    pub rows: usize,
    /// Their bytes, estimated.
    pub bytes: usize,
}

/// Estimated bytes a held row takes (values plus per-value overhead).
pub fn row_bytes(row: &Row) -> usize {
    64 + row.iter().map(|v| 32 + v.as_ref().map_or(0, Bytes::len)).sum::<usize>()
}

impl Caps {
    /// The clear error of a merge over `server.max_merge_bytes`.
    pub fn over_bytes(&self) -> ValueError {
        ValueError::Limit(format!(
            "the merge of this query holds more than {} bytes (server.max_merge_bytes); add a LIMIT, select fewer or smaller columns, narrow it to fewer merchants or months, or raise the limit",
            self.bytes
        ))
    }
}

impl<'a> Collector<'a> {
    /// A collector for rows with columns `cols`.
    pub fn new(spec: &'a MergeSpec, cols: Vec<Column>, cap: Caps) -> Self {
        let visible = cols.len().saturating_sub(spec.hidden);
        Collector { spec, cols, visible, cap, held: 0, groups: Vec::new(), index: HashMap::new(), distinct_values: 0 }
    }

    fn hold(&mut self, bytes: usize) -> Result<(), ValueError> {
        self.held += bytes;
        if self.held > self.cap.bytes {
            return Err(self.cap.over_bytes());
        }
        Ok(())
    }

    /// The DISTINCT aggregates: (hidden value column, aggregate column, kind).
    fn distincts(&self) -> Vec<(usize, usize, shardgate_router::DistinctKind)> {
        let Some(g) = &self.spec.grouping else { return Vec::new() };
        g.aggregates
            .iter()
            .filter_map(|(c, a)| match a {
                Agg::Distinct { of, kind } => Some((index(*of, self.visible), index(*c, self.visible), *kind)),
                _ => None,
            })
            .collect()
    }

    /// Adds a row's values to its group's distinct sets.
    fn add_distinct(&mut self, g: usize, row: &Row) -> Result<(), ValueError> {
        for (k, (of, _, kind)) in self.distincts().into_iter().enumerate() {
            let Some(v) = row.get(of).cloned().flatten() else { continue };
            let col = self.cols[of];
            let key = value::group_key(col.type_oid, col.binary, &v)?;
            let d = &mut self.groups[g].distinct[k];
            if d.seen.insert(key) {
                d.count += 1;
                d.sum.add(col.type_oid, Some(&v)).or_else(|e| match e {
                    // a type that cannot be summed is fine for count(DISTINCT …)
                    ValueError::Unsupported(_) if kind == shardgate_router::DistinctKind::Count => Ok(()),
                    e => Err(e),
                })?;
                self.distinct_values += 1;
                if self.distinct_values > self.cap.rows {
                    return Err(ValueError::Limit(format!(
                        "the merge of this query holds more than {} distinct values (server.max_merge_rows); narrow it to fewer merchants or months, or raise the limit",
                        self.cap.rows
                    )));
                }
                self.hold(64 + v.len())?;
            }
        }
        Ok(())
    }

    /// Columns combined by addition (counts, sums and the parts of averages).
    fn summed(&self) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        if let Some(g) = &self.spec.grouping {
            for (c, agg) in &g.aggregates {
                match agg {
                    Agg::Count => out.push((index(*c, self.visible), true)),
                    Agg::Sum => out.push((index(*c, self.visible), false)),
                    Agg::Avg { sum, count } => {
                        out.push((index(*sum, self.visible), false));
                        out.push((index(*count, self.visible), true));
                    }
                    Agg::Min | Agg::Max | Agg::Distinct { .. } => {}
                }
            }
        }
        out
    }

    fn group_key(&self, row: &Row) -> Result<Vec<Option<Key>>, ValueError> {
        let cols: Vec<usize> = match &self.spec.grouping {
            Some(g) => g.keys.iter().map(|c| index(*c, self.visible)).collect(),
            None => (0..self.visible).collect(), // DISTINCT on the visible columns
        };
        cols.into_iter()
            .map(|i| {
                let c = self.cols.get(i).ok_or(ValueError::Malformed("group column"))?;
                row.get(i).cloned().flatten().map(|v| value::group_key(c.type_oid, c.binary, &v)).transpose()
            })
            .collect()
    }

    /// Adds one target row.
    pub fn push(&mut self, row: Row) -> Result<(), ValueError> {
        let key = self.group_key(&row)?;
        let summed = self.summed();
        let slot = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                if self.groups.len() >= self.cap.rows {
                    return Err(ValueError::Limit(format!(
                        "the merge of this query holds more than {} groups or rows (server.max_merge_rows); add a LIMIT, narrow it to fewer merchants or months, or raise the limit",
                        self.cap.rows
                    )));
                }
                // the group's row, its key (about as large) and its accumulators
                self.hold(2 * row_bytes(&row) + 48 * summed.len())?;
                let accs = vec![Acc::Empty; summed.len()];
                let distinct = (0..self.distincts().len()).map(|_| Distinct::default()).collect();
                self.groups.push(Group { row: row.clone(), accs, distinct });
                self.index.insert(key, self.groups.len() - 1);
                let g = self.groups.len() - 1;
                // first row: its sums are the start value
                for (k, (col, _)) in summed.iter().enumerate() {
                    let t = self.cols[*col].type_oid;
                    self.groups[g].accs[k].add(t, row.get(*col).and_then(|v| v.as_deref()))?;
                }
                return self.add_distinct(g, &row);
            }
        };
        self.add_distinct(slot, &row)?;
        let cols = &self.cols;
        let g = &mut self.groups[slot];
        for (k, (col, _)) in summed.iter().enumerate() {
            g.accs[k].add(cols[*col].type_oid, row.get(*col).and_then(|v| v.as_deref()))?;
        }
        if let Some(grouping) = &self.spec.grouping {
            for (c, agg) in &grouping.aggregates {
                let i = index(*c, self.visible);
                let want = match agg {
                    Agg::Min => std::cmp::Ordering::Less,
                    Agg::Max => std::cmp::Ordering::Greater,
                    _ => continue,
                };
                let col = cols[i];
                if !value::orderable(col.type_oid) {
                    // compared as bytes, "$20.00" < "$5.25" and '1 day' < '2 hours'
                    return Err(ValueError::Unsupported(format!(
                        "min()/max() of type oid {} across shards is not supported (shardgate cannot order its values); \
                         cast it to a number, text or time type, or add the shard key to WHERE",
                        col.type_oid
                    )));
                }
                let Some(new) = row.get(i).cloned().flatten() else { continue };
                let replace = match &g.row[i] {
                    None => true,
                    Some(old) => decode(col.type_oid, col.binary, &new)?.cmp(&decode(col.type_oid, col.binary, old)?) == want,
                };
                if replace {
                    g.row[i] = Some(new);
                }
            }
        }
        Ok(())
    }

    /// Finishes: combined aggregates, HAVING, ORDER BY, OFFSET/LIMIT; rows
    /// with the visible columns (plus helpers, dropped by the writer).
    pub fn finish(mut self, client_binary: &[bool]) -> Result<Vec<Row>, ValueError> {
        let summed = self.summed();
        let visible = self.visible;
        let n_distinct = self.distincts().len();
        if self.groups.is_empty() && n_distinct > 0 && self.spec.grouping.as_ref().is_some_and(|g| g.keys.is_empty()) {
            // an aggregate without GROUP BY answers one row even over no rows (the targets,
            // grouping by the distinct values, sent none)
            self.groups.push(Group {
                row: vec![None; self.cols.len()],
                accs: vec![Acc::Empty; summed.len()],
                distinct: (0..n_distinct).map(|_| Distinct::default()).collect(),
            });
        }
        let mut rows = Vec::with_capacity(self.groups.len());
        for g in std::mem::take(&mut self.groups) {
            let mut row = g.row;
            // write combined sums back (text), then compute visible aggregates
            for (k, (col, _)) in summed.iter().enumerate() {
                let t = self.cols[*col].type_oid;
                row[*col] = g.accs[k].text(t).map(Bytes::from);
            }
            if let Some(grouping) = &self.spec.grouping {
                let mut next_distinct = 0;
                for (c, agg) in &grouping.aggregates {
                    let i = index(*c, visible);
                    let t = self.cols[i].type_oid;
                    let text: Option<String> = match agg {
                        Agg::Distinct { kind, .. } => {
                            let d = &g.distinct[next_distinct];
                            next_distinct += 1;
                            match kind {
                                shardgate_router::DistinctKind::Count => Some(d.count.to_string()),
                                shardgate_router::DistinctKind::Sum => d.sum.text(t),
                                shardgate_router::DistinctKind::Avg => match d.sum.text(t) {
                                    Some(s) if d.count > 0 => Some(avg_text(t, &s, d.count)?),
                                    _ => None,
                                },
                            }
                        }
                        Agg::Count | Agg::Sum => row[i].as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                        Agg::Avg { sum, count } => {
                            let s = row[index(*sum, visible)].as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
                            let n: i64 = row[index(*count, visible)].as_ref().and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()).unwrap_or(0);
                            match (s, n) {
                                (Some(s), n) if n > 0 => Some(avg_text(t, &s, n)?),
                                _ => None,
                            }
                        }
                        Agg::Min | Agg::Max => continue,
                    };
                    // counts of no rows are 0, not NULL
                    let text = if matches!(agg, Agg::Count | Agg::Distinct { kind: shardgate_router::DistinctKind::Count, .. }) {
                        Some(text.unwrap_or_else(|| "0".into()))
                    } else {
                        text
                    };
                    let binary = i < visible && client_binary.get(i).copied().unwrap_or(false);
                    row[i] = text.map(|t2| value::encode(t, binary, &t2).map(Bytes::from)).transpose()?;
                }
                if let Some(h) = &grouping.having {
                    if eval_having(h, &row, &self.cols, visible, client_binary)? != Some(true) {
                        continue;
                    }
                }
            }
            rows.push(row);
        }
        if self.spec.distinct && self.spec.grouping.is_some() {
            // SELECT DISTINCT … GROUP BY: the groups' visible values, de-duplicated
            let cols: Vec<Column> = self.effective_cols(client_binary);
            let mut seen = std::collections::HashSet::new();
            let mut kept = Vec::with_capacity(rows.len());
            for r in rows {
                let key: Vec<Option<Key>> = (0..visible).map(|i| r[i].as_ref().map(|v| value::group_key(cols[i].type_oid, cols[i].binary, v)).transpose()).collect::<Result<_, _>>()?;
                if seen.insert(key) {
                    kept.push(r);
                }
            }
            rows = kept;
        }
        if !self.spec.order_by.is_empty() {
            let cols: Vec<Column> = self.effective_cols(client_binary);
            check_orderable(&self.spec.order_by, &cols, visible)?;
            let mut keyed: Vec<(Vec<Option<Key>>, Row)> =
                rows.into_iter().map(|r| Ok((sort_keys(&r, &self.spec.order_by, &cols, visible)?, r))).collect::<Result<_, ValueError>>()?;
            keyed.sort_by(|a, b| compare_rows(&a.0, &b.0, &self.spec.order_by));
            rows = keyed.into_iter().map(|(_, r)| r).collect();
        }
        let offset = self.spec.offset.min(rows.len() as u64) as usize;
        let mut rows = rows.split_off(offset);
        if let Some(l) = self.spec.limit {
            rows.truncate(l.min(rows.len() as u64) as usize);
        }
        Ok(rows)
    }

    /// Column formats after aggregation: computed visible columns are in the client's format.
    fn effective_cols(&self, client_binary: &[bool]) -> Vec<Column> {
        let mut cols = self.cols.to_vec();
        if let Some(g) = &self.spec.grouping {
            for (c, agg) in &g.aggregates {
                let i = index(*c, self.visible);
                if !matches!(agg, Agg::Min | Agg::Max) {
                    cols[i].binary = i < self.visible && client_binary.get(i).copied().unwrap_or(false);
                }
            }
        }
        cols
    }
}

fn avg_text(type_oid: u32, sum: &str, n: i64) -> Result<String, ValueError> {
    match type_oid {
        value::oid::NUMERIC => value::numeric_avg(sum, n),
        value::oid::FLOAT8 => {
            let s: f64 = match sum {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                _ => sum.parse().map_err(|_| ValueError::Malformed("float"))?,
            };
            Ok(value::float8_text(s / n as f64))
        }
        other => Err(ValueError::Unsupported(format!("avg of type oid {other} across shards is not supported; narrow the query to one merchant"))),
    }
}

/// SQL three-valued HAVING on a merged group.
fn eval_having(h: &Having, row: &Row, cols: &[Column], visible: usize, client_binary: &[bool]) -> Result<Option<bool>, ValueError> {
    Ok(match h {
        Having::And(a, b) => match (eval_having(a, row, cols, visible, client_binary)?, eval_having(b, row, cols, visible, client_binary)?) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Having::Or(a, b) => match (eval_having(a, row, cols, visible, client_binary)?, eval_having(b, row, cols, visible, client_binary)?) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Having::Not(a) => eval_having(a, row, cols, visible, client_binary)?.map(|v| !v),
        Having::IsNull(o, negated) => {
            let null = operand(o, None, row, cols, visible, client_binary)?.is_none();
            Some(null != *negated)
        }
        Having::Cmp(a, op, b) => {
            // a string literal takes the type of the column it is compared with; a number
            // literal is integer or numeric by its spelling, and numbers of different kinds
            // compare by value (PostgreSQL's int8-numeric operators)
            let ty = [a, b].iter().find_map(|o| match o {
                Operand::Col(c) => Some(column_of(*c, cols, visible, client_binary)),
                _ => None,
            });
            let (Some(x), Some(y)) = (operand(a, ty, row, cols, visible, client_binary)?, operand(b, ty, row, cols, visible, client_binary)?) else {
                return Ok(None);
            };
            let o = value::cmp_values(&x, &y)?;
            use std::cmp::Ordering::*;
            Some(match op {
                CmpOp::Eq => o == Equal,
                CmpOp::NotEq => o != Equal,
                CmpOp::Lt => o == Less,
                CmpOp::LtEq => o != Greater,
                CmpOp::Gt => o == Greater,
                CmpOp::GtEq => o != Less,
            })
        }
    })
}

/// The format a merged column is in (computed aggregates are re-encoded for the client).
fn column_of(c: ColRef, cols: &[Column], visible: usize, client_binary: &[bool]) -> Column {
    let i = index(c, visible);
    let mut col = cols[i];
    if i < visible && !col.binary && client_binary.get(i).copied().unwrap_or(false) {
        // visible aggregates were asked for in text and encoded for the client
        col.binary = true;
    }
    col
}

fn operand(o: &Operand, ty: Option<Column>, row: &Row, cols: &[Column], visible: usize, client_binary: &[bool]) -> Result<Option<Key>, ValueError> {
    match o {
        Operand::Null => Ok(None),
        Operand::Col(c) => {
            let col = column_of(*c, cols, visible, client_binary);
            row[index(*c, visible)].as_ref().map(|v| decode(col.type_oid, col.binary, v)).transpose()
        }
        Operand::Number(n) => value::number_key(n).map(Some),
        Operand::Literal(l) => {
            let t = ty.map_or(value::oid::TEXT, |c| c.type_oid);
            decode(t, false, l.as_bytes()).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardgate_router::Grouping;

    fn t(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn groups_sum_count_avg_and_having() {
        // SELECT pay_status, count(*), sum(amount), avg(amount) ... GROUP BY 1 HAVING count(*) > 1 ORDER BY 1
        let spec = MergeSpec {
            hidden: 2,
            grouping: Some(Grouping {
                keys: vec![ColRef::Visible(0)],
                aggregates: vec![
                    (ColRef::Visible(1), Agg::Count),
                    (ColRef::Visible(2), Agg::Sum),
                    (ColRef::Visible(3), Agg::Avg { sum: ColRef::Hidden(0), count: ColRef::Hidden(1) }),
                ],
                having: Some(Having::Cmp(Operand::Col(ColRef::Visible(1)), CmpOp::Gt, Operand::Literal("1".into()))),
            }),
            distinct: false,
            order_by: vec![SortKey { col: ColRef::Visible(0), descending: false, nulls_first: false }],
            offset: 0,
            limit: None,
        };
        let text = |o| Column { type_oid: o, binary: false };
        let cols = [text(25), text(20), text(1700), text(1700), text(1700), text(20)];
        let mut c = Collector::new(&spec, cols.to_vec(), Caps { rows: 100, bytes: 1 << 20 });
        c.push(vec![t("PAID"), t("2"), t("3.00"), t("1.50"), t("3.00"), t("2")]).expect("push");
        c.push(vec![t("NEW"), t("1"), t("1.00"), t("1.00"), t("1.00"), t("1")]).expect("push");
        c.push(vec![t("PAID"), t("1"), t("0.50"), t("0.50"), t("0.50"), t("1")]).expect("push");
        let rows = c.finish(&[false; 4]).expect("finish");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0][..4], [t("PAID"), t("3"), t("3.50"), t("1.16666666666666666667")]);
    }

    #[test]
    fn group_cap_is_a_clear_error() {
        let spec = MergeSpec { hidden: 0, grouping: None, distinct: true, order_by: vec![], offset: 0, limit: None };
        let cols = [Column { type_oid: 20, binary: false }];
        let mut c = Collector::new(&spec, cols.to_vec(), Caps { rows: 2, bytes: 1 << 20 });
        c.push(vec![t("1")]).expect("1");
        c.push(vec![t("1")]).expect("dup");
        c.push(vec![t("2")]).expect("2");
        assert!(matches!(c.push(vec![t("3")]), Err(ValueError::Limit(m)) if m.contains("max_merge_rows")));
    }

    #[test]
    fn byte_cap_is_a_clear_error() {
        let spec = MergeSpec { hidden: 0, grouping: None, distinct: true, order_by: vec![], offset: 0, limit: None };
        let cols = [Column { type_oid: 25, binary: false }];
        let mut c = Collector::new(&spec, cols.to_vec(), Caps { rows: 1000, bytes: 10_000 });
        let big = |i: usize| Some(Bytes::from(format!("{i:0>2000}")));
        c.push(vec![big(1)]).expect("1");
        c.push(vec![big(1)]).expect("a duplicate holds nothing more");
        let e = (2..10).find_map(|i| c.push(vec![big(i)]).err()).expect("over 10,000 bytes within a few 2,000-byte groups");
        assert!(matches!(e, ValueError::Limit(m) if m.contains("max_merge_bytes")));
    }

    #[test]
    fn data_rows_round_trip_and_trim() {
        let row = vec![t("a"), None, t("ccc")];
        let mut out = BytesMut::new();
        put_data_row(&mut out, &row, 3);
        let body = &out[5..];
        assert_eq!(parse_data_row(body).expect("parse"), row);
        let mut trimmed = BytesMut::new();
        trim_data_row(&mut trimmed, body, 2).expect("trim");
        assert_eq!(parse_data_row(&trimmed[5..]).expect("parse"), vec![t("a"), None]);
    }
}
