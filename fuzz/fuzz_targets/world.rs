//! The fixed topology, months and id generator the fuzz targets plan in.

use std::sync::OnceLock;

use shardgate_router::id::{IdGenerator, SystemClock};
use shardgate_router::month::MonthKey;
use shardgate_router::{Context, Topology};

pub struct World {
    pub topo: Topology,
    pub months: Vec<MonthKey>,
    pub ids: IdGenerator,
}

pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let topo = Topology::example();
        let months = (1..=12).filter_map(|m| MonthKey::new(2026, m)).collect();
        let ids = IdGenerator::new(topo.ids.clone(), 1, 50, Box::new(SystemClock), 0).expect("ids");
        World { topo, months, ids }
    })
}

impl World {
    /// A planning context at 2026-11-22T10:00:00Z.
    pub fn ctx(&self) -> Context<'_> {
        Context { now: jiff::Timestamp::from_second(1_795_341_600).expect("now"), months: &self.months, ids: Some(&self.ids), zone: Default::default(), lookups: &[] }
    }
}
