// The overview, pools, pin rules and events panels, drawn from the status and the events.

import { el, fill, byId, table, percent, ratio, ms, rate, seconds, clock } from "./dom.js";

const COLORS = ["blue", "green"];
const SHOWN_EVENTS = 300; // the newest that match the filter

function role(split, color) {
  return color === split.live ? "live" : "candidate";
}

// -- overview ----------------------------------------------------------------------------

export function renderOverview(status) {
  const split = status.split;
  const weight = split.candidate_weight / 100;
  const moved = COLORS.some((c) => split.effective_shares[c] !== split.shares[c]);
  fill(
    byId("split"),
    `live ${split.live}, candidate ${split.candidate} at ${Number(weight.toFixed(2))}%`,
    moved ? ` (routed now: ${COLORS.map((c) => `${c} ${percent(split.effective_shares[c])}`).join(", ")}:` +
      " a color with no routable upstream gives its share to the other)" : "",
  );
  fill(byId("split-bar"), COLORS.map((color) => {
    const part = el("div", { class: `part ${color}` }, `${color} ${percent(split.effective_shares[color], 0)}`);
    part.style.width = `${split.effective_shares[color]}%`;
    return part;
  }));
  fill(byId("colors"), COLORS.map((color) => {
    const pool = status.pools[color];
    const traffic = pool.window;
    const routable = pool.upstreams.filter((u) => u.routable).length;
    const facts = [
      ["version", pool.version || "–"],
      ["routable upstreams", `${routable} of ${pool.upstreams.length}`],
      [`requests (last ${seconds(traffic.seconds)})`, rate(traffic.requests_per_second)],
      ["error rate", ratio(traffic.error_rate)],
      ["p50 / p99", `${ms(traffic.p50_ms)} / ${ms(traffic.p99_ms)}`],
      ["in flight", traffic.pending],
    ];
    return el(
      "article",
      { class: `color ${color}`, "data-testid": `color-${color}` },
      el("h3", {}, el("span", { class: `swatch ${color}`, "aria-hidden": "true" }), `${color}: ${role(split, color)}`),
      el("dl", {}, facts.map(([name, value]) => [el("dt", {}, name), el("dd", {}, value)])),
    );
  }));
}

// -- pools -------------------------------------------------------------------------------

function upstreamRows(upstreams) {
  return upstreams.map((u) => [
    u.id,
    u.state,
    `${u.health} (${u.health_check}${u.health_reason ? `: ${u.health_reason}` : ""})`,
    u.routable ? "yes" : "no",
    String(u.in_flight),
    String(u.tunnels),
    u.ejected_for === null ? "no" : `${seconds(u.ejected_for)} left`,
    u.drained ? "yes" : "no",
    String(u.weight),
  ]);
}

const UPSTREAM_HEADERS = ["upstream", "state", "health", "routable", "in flight", "tunnels", "ejected", "drained", "weight"];

/**
 * Each pool's upstreams, and a drain form per pool. The forms are remade only when the
 * upstreams change, so that a redraw every second does not take the focus from them.
 */
export function poolsPanel(container, command) {
  let forms = "";
  const tables = {};
  const controls = {};
  for (const color of COLORS) {
    tables[color] = el("div", { class: "pool-table" });
    controls[color] = el("div", { class: "pool-controls" });
    container.append(el("div", { class: `pool ${color}`, "data-testid": `pool-${color}` },
      el("h3", { id: `pool-${color}` }), tables[color], controls[color]));
  }

  function form(color, upstreams) {
    const id = `drain-target-${color}`;
    const select = el("select", { id },
      el("option", { value: "" }, `every upstream of ${color}`),
      upstreams.map((u) => el("option", { value: u.id }, u.id)));
    const target = () => (select.value ? { upstream: select.value } : { color });
    const name = () => select.value || `every upstream of ${color}`;
    const drain = el("button", { type: "button", "data-action": `drain-${color}` }, "Drain");
    drain.addEventListener("click", () => command("/v1/drain", target(),
      `Drain ${name()}? New requests go elsewhere; requests in flight finish.`));
    const undrain = el("button", { type: "button", "data-action": `undrain-${color}` }, "Undrain");
    undrain.addEventListener("click", () => command("/v1/undrain", target(),
      `Undrain ${name()}? It takes traffic again once its health checks pass.`));
    return [el("label", { for: id }, "Target"), select, drain, undrain];
  }

  return (status) => {
    for (const color of COLORS) {
      const pool = status.pools[color];
      fill(byId(`pool-${color}`), el("span", { class: `swatch ${color}`, "aria-hidden": "true" }),
        `${color}: ${role(status.split, color)}, version ${pool.version || "–"}, share ${percent(pool.share)} (routed ${percent(pool.effective_share)})`);
      fill(tables[color], pool.upstreams.length
        ? table(null, UPSTREAM_HEADERS, upstreamRows(pool.upstreams))
        : el("p", {}, "No upstream."));
    }
    const ids = JSON.stringify(COLORS.map((c) => status.pools[c].upstreams.map((u) => u.id)));
    if (ids !== forms) {
      forms = ids;
      for (const color of COLORS) fill(controls[color], form(color, status.pools[color].upstreams));
    }
  };
}

// -- pin rules ---------------------------------------------------------------------------

function conditions(rule) {
  const parts = [];
  if (rule.header) parts.push(`header ${rule.header} in ${rule.values.join(", ")}`);
  if (rule.cookie) parts.push(`cookie ${rule.cookie} in ${rule.values.join(", ")}`);
  if (rule.host.length) parts.push(`host ${rule.host.join(", ")}`);
  if (rule.path_prefix.length) parts.push(`path starts with ${rule.path_prefix.join(", ")}`);
  if (rule.network.length) parts.push(`client in ${rule.network.join(", ")}`);
  return parts.join("; ") || "–";
}

export function renderRules(status) {
  const rules = status.rules;
  const fallback = status.pin_fallback;
  fill(
    byId("rules"),
    rules.length
      ? table(null, ["name", "matches", "to", "after a rollback"],
        rules.map((r, i) => [r.name || `pins[${i}]`, conditions(r), r.to, r.after_rollback]))
      : el("p", {}, "No pin rules."),
    fallback ? el("p", { class: "notice" },
      `After rollout ${fallback.rollout} (${fallback.outcome.replace("_", " ")}), the rules leading to ${fallback.color} send their users to ${fallback.live}: ${fallback.rules.join(", ") || "none"}.`) : null,
  );
}

// -- events ------------------------------------------------------------------------------

/** The kinds seen so far in the filter, keeping the one chosen. */
export function renderKinds(events) {
  const select = byId("event-kind");
  const known = new Set([...select.options].map((o) => o.value));
  const fresh = [...new Set(events.map((e) => e.kind))].filter((k) => !known.has(k));
  for (const kind of fresh.sort()) select.append(el("option", { value: kind }, kind));
}

export function renderEvents(events) {
  const kind = byId("event-kind").value;
  const shown = events.filter((e) => !kind || e.kind === kind).slice(-SHOWN_EVENTS).reverse();
  fill(byId("events"), shown.map((e) =>
    el("li", { class: `event ${e.kind}`, "data-event-id": e.id },
      el("time", { datetime: e.timestamp }, clock(e.time)),
      el("span", { class: "id" }, `#${e.id}`),
      el("span", { class: "kind" }, e.kind),
      el("span", { class: "by" }, `[${e.by}]`),
      el("span", { class: "reason" }, e.reason))));
}
