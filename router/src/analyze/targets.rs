//! From an analysis and the statement's values to a plan: the targets (shard,
//! month tables), the text each target runs, the ids filled in.

use super::*;

/// The FROM text for a target: one month table, a UNION ALL of several, or the empty template.
pub(super) fn table_text(rule: &TableRule, months: &[MonthKey]) -> String {
    match months {
        [] => rule.name.clone(),
        [m] => rule.physical(*m),
        many => {
            let mut out = String::with_capacity(many.len() * (rule.pattern.len() + 26) + 2);
            out.push('(');
            for (i, m) in many.iter().enumerate() {
                out.push_str(if i == 0 { "SELECT * FROM " } else { " UNION ALL SELECT * FROM " });
                rule.push_physical(&mut out, *m);
            }
            out.push(')');
            out
        }
    }
}

pub(super) fn count_value(c: Option<Count>, params: &[Param<'_>], what: &str) -> Result<Option<u64>> {
    let Some(c) = c else { return Ok(None) };
    match c {
        Count::Lit(n) => Ok(Some(n)),
        Count::Param(i) => match crate::extract::int_value(&Src::Param(i), params)? {
            crate::extract::IntValue::Int(n) => {
                u64::try_from(n).map(Some).map_err(|_| RouteError::InvalidLimit(format!("{what} must not be negative")))
            }
            crate::extract::IntValue::Null => Ok(None),
            crate::extract::IntValue::Unroutable => Err(RouteError::unsupported(format!("{what} must be an integer"))),
        },
    }
}

/// Shard × month pairs (or shard → months) from a target set.
pub(super) fn groups(set: &crate::extract::TargetSet, months: &[MonthKey], shard_count: u8, per_month: bool) -> Vec<(ShardId, Vec<MonthKey>)> {
    let mut out = Vec::new();
    for s in 0..shard_count {
        let bit = 1u8 << s;
        let ms: Vec<MonthKey> = months.iter().zip(&set.masks).filter(|(_, m)| *m & bit != 0).map(|(k, _)| *k).collect();
        if ms.is_empty() {
            continue;
        }
        if per_month {
            out.extend(ms.into_iter().map(|m| (ShardId(s), vec![m])));
        } else {
            out.push((ShardId(s), ms));
        }
    }
    if out.is_empty() {
        // No existing month can hold a matching row: run once on the empty template
        // table so the client still gets the right columns (and count = 0, etc.).
        let mask = set.shard_mask();
        let shard = (0..shard_count).find(|s| mask & (1 << s) != 0).unwrap_or(0);
        out.push((ShardId(shard), Vec::new()));
    }
    out
}

/// Renders the text of each distinct month set once: a statement spread over
/// all shards runs the same text on each of them.
pub(super) fn shared_texts(
    groups: Vec<(ShardId, Vec<MonthKey>)>,
    mut render: impl FnMut(&[MonthKey]) -> std::sync::Arc<str>,
) -> impl Iterator<Item = (ShardId, Vec<MonthKey>, std::sync::Arc<str>)> {
    let mut done: Vec<(Vec<MonthKey>, std::sync::Arc<str>)> = Vec::new();
    groups.into_iter().map(move |(shard, months)| {
        let sql = match done.iter().find(|(m, _)| *m == months) {
            Some((_, sql)) => sql.clone(),
            None => {
                let sql = render(&months);
                done.push((months.clone(), sql.clone()));
                sql
            }
        };
        (shard, months, sql)
    })
}

impl Analysis {
    /// The unique-lookup values (`(table, column, value)`) whose entries could
    /// narrow this statement's targets: look them up and pass them in
    /// [`Context::lookups`]. Empty for INSERTs and statements without them.
    pub fn lookup_probes(&self, params: &[Param<'_>]) -> Vec<crate::extract::Probe> {
        let mut out = Vec::new();
        match self {
            Analysis::Select(a) => a.cond.lookup_probes(params, &mut out),
            Analysis::Write(a) => a.cond.lookup_probes(params, &mut out),
            _ => {}
        }
        out.dedup();
        out
    }

    /// The one unique-lookup value a cached location may route this
    /// statement by, checked by its answer: `Some` only for a plain SELECT of
    /// rows of the sharded table (one FROM item, no join, WITH, GROUP BY,
    /// HAVING, subquery, or function call other than a window call anywhere:
    /// an aggregate the router does not know would answer a row from nothing,
    /// and a function in LIMIT runs before any row) whose WHERE has
    /// `unique_col = v` as a conjunct. Every row of its answer then holds that
    /// value, which is unique across shards: if the answer at the cached place
    /// has a row, that place was right; an empty answer says nothing (the
    /// caller asks the lookup table and runs it again), and running it
    /// somewhere without rows changed nothing.
    pub fn lookup_hint(&self, params: &[Param<'_>]) -> Option<crate::extract::Probe> {
        let Analysis::Select(a) = self else { return None };
        if a.references != 1 || a.query.with.is_some() {
            return None;
        }
        let SetExpr::Select(s) = a.query.body.as_ref() else { return None };
        let plain_from = matches!(s.from.as_slice(), [t] if t.joins.is_empty()
            && matches!(&t.relation, sqlparser::ast::TableFactor::Table { name, .. } if crate::rewrite::object_base(name).as_deref() == Some(crate::rewrite::HOLE_TABLE)));
        let no_groups = matches!(&s.group_by, sqlparser::ast::GroupByExpr::Expressions(v, m) if v.is_empty() && m.is_empty());
        if !plain_from || !no_groups || s.having.is_some() || s.into.is_some() || s.qualify.is_some() {
            return None;
        }
        let lookups: Vec<&crate::extract::Cond> = match &a.cond {
            c @ crate::extract::Cond::Lookup { .. } => vec![c],
            crate::extract::Cond::And(parts) => parts.iter().filter(|p| matches!(p, crate::extract::Cond::Lookup { .. })).collect(),
            _ => return None,
        };
        let [crate::extract::Cond::Lookup { table, column, vals }] = lookups.as_slice() else { return None };
        // (the walk over the statement only for one that has such a condition)
        let mut called = false;
        let _ = sqlparser::ast::visit_expressions(&a.query, |e| {
            called |= match e {
                // a window call gives a value per row of the answer, in the projection only
                Expr::Function(f) => f.over.is_none(),
                Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. } => true,
                _ => false,
            };
            ControlFlow::<()>::Continue(())
        });
        if called {
            return None;
        }
        let [v] = vals.as_slice() else { return None };
        let crate::extract::LookupText::Text(value) = crate::extract::lookup_text(v, params).ok()? else { return None };
        let param = if let crate::extract::Src::Param(i) = v { Some(*i) } else { None };
        Some(crate::extract::Probe { table: table.clone(), column: column.clone(), value, param })
    }

    /// Applies bind values and context.
    pub fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        match self {
            Analysis::Passthrough(c) => Ok(Plan::Passthrough(*c)),
            Analysis::Refused(e) => Err(e.clone()),
            Analysis::Select(a) => a.plan(params, topo, ctx),
            Analysis::Write(a) => a.plan(params, topo, ctx),
            Analysis::Insert(a) => a.plan(params, topo, ctx),
        }
    }
}

/// `$n` indexes in order of first appearance.
pub(super) fn placeholders(q: &sqlparser::ast::Query) -> Vec<usize> {
    let mut out = Vec::new();
    let _ = sqlparser::ast::visit_expressions(q, |e| {
        if let Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) = e {
            if let Some(i) = crate::extract::placeholder_index(p) {
                if !out.contains(&i) {
                    out.push(i);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    out
}

impl SelectAnalysis {
    fn scatter_form(&self, rule: &TableRule) -> std::result::Result<&ScatterForm, RouteError> {
        self.scatter
            .get_or_init(|| {
                if self.references != 1 {
                    return Err(RouteError::unsupported(format!(
                        "{} appears more than once in a statement that spans shards; add {} = … so it runs on one shard",
                        rule.name, rule.shard_key
                    )));
                }
                let mut sc = scatter(&self.query, rule)?;
                let mut ren = Renumber { map: Vec::new() };
                let _ = sc.query.visit(&mut ren);
                let params = (ren.map != placeholders(&self.query)).then_some(ren.map);
                Ok(ScatterForm { template: Template::parse(&sc.query.to_string()), scatter: sc, params })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let set = self.cond.eval(params, topo, ctx)?;
        let gs = groups(&set, ctx.months, topo.shard_count, self.locking);
        if gs.len() == 1 {
            let (shard, months) = gs.into_iter().next().expect("one group");
            let sql = self.renders.get(&months, 0, || {
                let single = self.single.get_or_init(|| Template::parse(&self.query.to_string()));
                single.render(&table_text(rule, &months), None, &[], &[])
            });
            return Ok(Plan::Routed(Box::new(Routed {
                kind: RoutedKind::Select,
                table: rule.name.clone(),
                targets: vec![Target { shard, months, sql, params: None, extra: Vec::new() }],
                merge: None,
                generated_ids: Vec::new(),
                logical: None,
                row_targets: Vec::new(),
                lookup_rows: Vec::new(),
            })));
        }
        let form = self.scatter_form(rule)?;
        let (template, sc) = (&form.template, &form.scatter);
        let limit = count_value(sc.limit, params, "LIMIT")?;
        let offset = count_value(sc.offset, params, "OFFSET")?.unwrap_or(0);
        let pushed = if sc.push_limit { limit.map(|l| l.saturating_add(offset)) } else { None };
        let targets = shared_texts(gs, |months| template.render(&table_text(rule, months), pushed, &[], &[]).into())
            .map(|(shard, months, sql)| Target { shard, months, sql, params: form.params.clone(), extra: Vec::new() })
            .collect();
        let mut spec = sc.spec.clone();
        spec.limit = limit;
        spec.offset = offset;
        Ok(Plan::Routed(Box::new(Routed { kind: RoutedKind::Select, table: rule.name.clone(), targets, merge: Some(spec), generated_ids: Vec::new(), row_targets: Vec::new(), logical: None, lookup_rows: Vec::new() })))
    }
}

impl WriteAnalysis {
    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let set = self.cond.eval(params, topo, ctx)?;
        let gs = groups(&set, ctx.months, topo.shard_count, true);
        let targets = shared_texts(gs, |months| self.renders.get(months, 0, || self.template.render(&table_text(rule, months), None, &[], &[])))
            .map(|(shard, months, sql)| Target { shard, months, sql, params: None, extra: Vec::new() })
            .collect();
        Ok(Plan::Routed(Box::new(Routed { kind: self.kind, table: rule.name.clone(), targets, merge: None, generated_ids: Vec::new(), row_targets: Vec::new(), logical: None, lookup_rows: Vec::new() })))
    }
}

/// Renumbers `$n` placeholders in order of first appearance; records the original indexes.
pub(super) struct Renumber {
    map: Vec<usize>,
}

impl VisitorMut for Renumber {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Value(ValueWithSpan { value: Value::Placeholder(p), .. }) = e {
            if let Some(old) = crate::extract::placeholder_index(p) {
                let new = match self.map.iter().position(|o| *o == old) {
                    Some(i) => i,
                    None => {
                        self.map.push(old);
                        self.map.len() - 1
                    }
                };
                *p = format!("${}", new + 1);
            }
        }
        ControlFlow::Continue(())
    }
}

/// With `ids.route_by_id`, lookups trust what a decodable id says: an explicit
/// id above `ids.legacy_id_max` that decodes must name its row's shard and month.
pub(super) fn check_explicit_id(id: Option<&Src>, shard: ShardId, month: MonthKey, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>, rule: &TableRule) -> Result<()> {
    let hint = "omit the id to have shardgate generate one, keep application ids at or below ids.legacy_id_max, or set ids.route_by_id = false";
    let Some(src) = id else {
        return Err(RouteError::unsupported(format!(
            "with ids.route_by_id = true, {} in an INSERT into {} must be a literal or a $n parameter; {hint}",
            rule.id_column, rule.name
        )));
    };
    if let crate::extract::IntValue::Int(v) = crate::extract::int_value(src, params)? {
        if let Some(d) = topo.ids.decode(v, ctx.now, &topo.tz) {
            if d.shard != shard || d.month.is_some_and(|m| m != month) {
                return Err(RouteError::unsupported(format!(
                    "{} {v} reads as a shardgate id of db_{}{}, but the row belongs to db_{} month {}: a lookup by this id would miss it; {hint}",
                    rule.id_column,
                    d.shard.0,
                    d.month.map(|m| format!(" month {}", m.suffix())).unwrap_or_default(),
                    shard.0,
                    month.suffix()
                )));
            }
        }
    }
    Ok(())
}

impl InsertAnalysis {
    fn plan(&self, params: &[Param<'_>], topo: &Topology, ctx: &Context<'_>) -> Result<Plan> {
        let rule = &topo.tables[self.rule];
        let now_month = MonthKey::of(ctx.now, &topo.tz);
        let mut keys = Vec::with_capacity(self.rows.len());
        let mut lookup_rows = Vec::new();
        for r in &self.rows {
            let shard = row_shard(&r.shard, params, topo, rule)?;
            let month = match &r.time {
                Some(t) => row_month(t, params, topo, ctx, rule)?,
                None => now_month,
            };
            for (src, column) in r.lookups.iter().zip(&rule.unique_lookups) {
                match crate::extract::lookup_text(src, params)? {
                    // NULLs are not unique values (as in a unique index); the column's NOT NULL speaks
                    crate::extract::LookupText::Null => {}
                    crate::extract::LookupText::Text(value) => {
                        let crate::extract::IntValue::Int(shard_key) = crate::extract::int_value(&r.shard, params)? else {
                            unreachable!("row_shard accepted it")
                        };
                        let param = if let Src::Param(i) = src { Some(*i) } else { None };
                        lookup_rows.push(crate::plan::LookupRow { column: column.clone(), value, shard_key, month, param });
                    }
                    crate::extract::LookupText::Unknown => {
                        return Err(RouteError::unsupported(format!(
                            "{column} must be bound as text (or an integer type) in an INSERT into {}: it is kept unique across shards (unique_lookups)",
                            rule.name
                        )))
                    }
                }
            }
            if topo.ids.route_by_id {
                if let Some(id) = &r.id {
                    check_explicit_id(id.as_ref(), shard, month, params, topo, ctx, rule)?;
                }
            }
            keys.push((shard, month));
        }
        let mut ids = Vec::new();
        // one generated id per row that omits the column or says DEFAULT, in row order
        let mut row_ids: Vec<Option<String>> = vec![None; keys.len()];
        if self.generate_id || self.rows.iter().any(|r| r.id_default) {
            let Some(gen) = ctx.ids else {
                return Err(RouteError::IdGeneration(format!("no id generator configured; INSERT into {} must set {}", rule.name, rule.id_column)));
            };
            for (i, (shard, month)) in keys.iter().enumerate() {
                if self.generate_id || self.rows[i].id_default {
                    let id = gen.next_for_row(*shard, Some(*month), ctx.now, &topo.tz)?;
                    ids.push(id);
                    row_ids[i] = Some(id.to_string());
                }
            }
        }
        let id_text: Vec<String> = row_ids.iter().flatten().cloned().collect();
        // one time value per row that takes the proxy's now (omitted column or now()),
        // printed once
        let now_text = ctx.now.to_string();
        let now_literal = format!("'{now_text}'");
        let row_time: Vec<Option<String>> = self.rows.iter().map(|r| r.time.is_none().then(|| now_literal.clone())).collect();
        let time_text: Vec<String> = row_time.iter().flatten().cloned().collect();
        // a bound statement gets its generated values as parameters (see `Target::extra`)
        let bound = !params.is_empty();
        // the placeholders after the client's `first` values, and the values they stand for
        let holes = |first: usize, ids: &[String], times: usize| -> (Vec<String>, Vec<String>) {
            let id_holes = (0..ids.len()).map(|i| format!("${}", first + i + 1)).collect();
            let time_holes = (0..times).map(|i| format!("${}", first + ids.len() + i + 1)).collect();
            (id_holes, time_holes)
        };
        let extra = |ids: &[String], times: usize| -> Vec<String> { ids.iter().cloned().chain(std::iter::repeat_n(now_text.clone(), times)).collect() };
        // Group rows by target, in order of first appearance.
        let mut order: Vec<(ShardId, MonthKey)> = Vec::new();
        for k in &keys {
            if !order.contains(k) {
                order.push(*k);
            }
        }
        let targets = if order.len() == 1 {
            let (shard, month) = order[0];
            if bound {
                // (the text depends only on the month and how many values precede and fill holes)
                let variant = (params.len() as u64) << 32 | (id_text.len() as u64) << 16 | time_text.len() as u64;
                let sql = self.renders.get(&[month], variant, || {
                    let (id_holes, time_holes) = holes(params.len(), &id_text, time_text.len());
                    self.template.render(&rule.physical(month), None, &id_holes, &time_holes)
                });
                vec![Target { shard, months: vec![month], sql, params: None, extra: extra(&id_text, time_text.len()) }]
            } else {
                let sql = self.template.render(&rule.physical(month), None, &id_text, &time_text);
                vec![Target { shard, months: vec![month], sql: sql.into(), params: None, extra: Vec::new() }]
            }
        } else {
            let mut out = Vec::with_capacity(order.len());
            for &(shard, month) in &order {
                let rows: Vec<usize> = (0..keys.len()).filter(|i| keys[*i] == (shard, month)).collect();
                let mut stmt = self.stmt.clone();
                if let Statement::Insert(ins) = &mut stmt {
                    if let Some(SetExpr::Values(v)) = ins.source.as_mut().map(|s| s.body.as_mut()) {
                        let all = std::mem::take(&mut v.rows);
                        v.rows = all.into_iter().enumerate().filter(|(i, _)| rows.contains(i)).map(|(_, r)| r).collect();
                    }
                }
                let mut ren = Renumber { map: Vec::new() };
                let _ = stmt.visit(&mut ren);
                let row_id_text: Vec<String> = rows.iter().filter_map(|i| row_ids[*i].clone()).collect();
                let times: Vec<String> = rows.iter().filter_map(|i| row_time[*i].clone()).collect();
                let template = Template::parse(&stmt.to_string());
                let (sql, extra) = if bound {
                    let (id_holes, time_holes) = holes(ren.map.len(), &row_id_text, times.len());
                    (template.render(&rule.physical(month), None, &id_holes, &time_holes), extra(&row_id_text, times.len()))
                } else {
                    (template.render(&rule.physical(month), None, &row_id_text, &times), Vec::new())
                };
                let params = if params.is_empty() && ren.map.is_empty() { None } else { Some(ren.map) };
                out.push(Target { shard, months: vec![month], sql: sql.into(), params, extra });
            }
            out
        };
        // which target each VALUES row went to (so RETURNING rows can be put back in row order)
        let row_targets = if targets.len() > 1 { keys.iter().map(|k| order.iter().position(|o| o == k).unwrap_or(0)).collect() } else { Vec::new() };
        let logical = Some(self.template.render(&rule.name, None, &id_text, &time_text));
        Ok(Plan::Routed(Box::new(Routed { kind: RoutedKind::Insert, table: rule.name.clone(), targets, merge: None, generated_ids: ids, row_targets, logical, lookup_rows })))
    }
}
