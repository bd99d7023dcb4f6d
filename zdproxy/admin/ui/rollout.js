// The rollout panel: state, the plan's steps as a timeline, the judge's verdict with its
// numbers and their history (the rollout's events), and the commands.

import { el, fill, byId, table, percent, ratio, ms, seconds, clock } from "./dom.js";

// Which state each command applies in (control/rollout: the API refuses it otherwise).
const COMMANDS = [
  { action: "pause", label: "Pause", states: ["step"], ask: "Pause the rollout? The current step holds (the judge still runs)." },
  { action: "resume", label: "Resume", states: ["paused"], ask: "Resume the rollout? The step's hold starts again." },
  { action: "promote", label: "Promote", states: ["step", "paused"], ask: "Promote the candidate? It skips the remaining steps and goes live now." },
  { action: "abort", label: "Abort (roll back)", states: ["preflight", "step", "paused", "baking", "finishing"], ask: "Abort the rollout? The old live color takes all the traffic again." },
  { action: "retry", label: "Retry", states: ["rolled_back", "aborted", "frozen", "failed"], ask: "Retry the rollout? It starts again from its first step." },
];
const ENDED = ["done", "rolled_back", "aborted", "frozen", "failed"];

function words(state) {
  return state.replace("_", " ");
}

function summary(rollout) {
  if (rollout.state === "idle") return "No rollout yet.";
  const where = rollout.step && rollout.steps ? `, step ${rollout.step} of ${rollout.steps}` : "";
  const share = rollout.share === null || rollout.share === undefined ? "" : `, candidate at ${percent(rollout.share, 1)}`;
  return `Rollout ${rollout.id}: ${rollout.candidate} (from ${rollout.previous}), plan ${rollout.plan}${where}${share}: ${words(rollout.state)}.`;
}

/** When the rollout entered each step, from its history. */
function entered(rollout) {
  const times = new Map();
  for (const entry of rollout.history) {
    if (entry.state === "step" && !times.has(entry.step)) times.set(entry.step, entry.time);
  }
  return times;
}

/** Each step, then the bake, as passed, current (or paused) or pending; where a rollout
 * ended, the phase it ended in carries its end (rolled back, aborted...). */
function timeline(rollout) {
  const times = entered(rollout);
  const reached = Math.max(0, ...rollout.history.map((e) => e.step));
  const baked = rollout.history.some((e) => e.state === "baking");
  const ended = ENDED.includes(rollout.state);
  const here = ended ? rollout.state : rollout.state === "paused" ? "paused" : "current";
  const items = rollout.plan_steps.map((step, index) => {
    const number = index + 1;
    let phase = "pending";
    if (baked || number < reached) phase = "passed";
    else if (number === reached) phase = here;
    const when = times.has(number) ? ` from ${clock(times.get(number))}` : "";
    return el(
      "li",
      { class: `step ${phase}`, "aria-current": phase === "current" ? "step" : false },
      `${number}: ${percent(step.weight, 0)}, hold ${seconds(step.hold)}${when} (${words(phase)})`,
    );
  });
  if (rollout.bake !== null && rollout.bake !== undefined) {
    let phase = "pending";
    if (baked) phase = rollout.state === "done" ? "passed" : ended ? rollout.state : "current";
    items.push(el("li", { class: `step ${phase}`, "aria-current": phase === "current" ? "step" : false },
      `bake ${seconds(rollout.bake)} (${words(phase)})`));
  }
  if (ended) items.push(el("li", { class: `step ${rollout.state}` }, words(rollout.state)));
  return items;
}

function judgeNumbers(judge) {
  const numbers = judge.numbers;
  const candidate = numbers.candidate;
  const reference = numbers.reference;
  const lines = [
    el("p", { "data-testid": "judge-verdict", class: `verdict ${judge.verdict}` },
      `Judge: ${judge.verdict}${numbers.phase ? ` (${numbers.phase})` : ""}: ${judge.reason}`),
    el("p", {},
      `evidence ${numbers.evidence === null || numbers.evidence === undefined ? "–" : numbers.evidence.toFixed(2)} (1 fails)`,
      numbers.hold_left_seconds !== null && numbers.hold_left_seconds !== undefined ? `; hold left ${seconds(numbers.hold_left_seconds)}` : "",
      numbers.requests_needed ? `; ${numbers.requests_needed} more candidate requests needed` : "",
      numbers.eta_seconds ? ` (about ${seconds(numbers.eta_seconds)})` : ""),
  ];
  const rows = [];
  if (candidate) {
    rows.push(["candidate", candidate.requests, candidate.errors, ratio(candidate.error_rate), "–", "–"]);
  }
  if (reference) {
    rows.push([`live${reference.frozen ? " (before the switch)" : ""}`, reference.requests, reference.errors,
      ratio(reference.error_rate), ms(reference.p50_ms), ms(reference.p99_ms)]);
  }
  if (rows.length) {
    lines.push(table("Over the phase", ["", "requests", "errors", "error rate", "p50", "p99"], rows));
  }
  const tests = Object.entries(numbers.tests || {});
  if (tests.length) {
    lines.push(table("Tests", ["test", "observed", "limit", "events / trials", "evidence"],
      tests.map(([name, t]) => [name, ratio(t.observed), ratio(t.limit), `${t.events} / ${t.trials} ${t.of}`,
        t.evidence.toFixed(2)]), { "data-testid": "judge-tests" }));
  }
  return lines;
}

function history(rollout, events) {
  const mine = events.filter((e) => e.kind.startsWith("rollout_") && e.data.rollout === rollout.id);
  if (!mine.length) return null;
  const rows = mine.slice(-20).reverse().map((e) => [
    clock(e.time),
    words(e.kind.replace("rollout_", "")),
    e.data.numbers && e.data.numbers.evidence !== undefined && e.data.numbers.evidence !== null
      ? e.data.numbers.evidence.toFixed(2) : "–",
    e.reason,
  ]);
  return table("History (the rollout's events, newest first)", ["time", "state", "evidence", "reason"], rows,
    { "data-testid": "rollout-history" });
}

/** The command buttons, made once (a redraw would take the keyboard focus away): the
 * returned function enables those that apply in a state. `command(path, body, question)`
 * runs one after its confirmation. */
export function rolloutCommands(container, command) {
  const buttons = COMMANDS.map(({ action, label, states, ask }) => {
    const button = el("button", { type: "button", "data-action": action, disabled: true }, label);
    button.addEventListener("click", () => command(`/v1/rollout/${action}`, undefined, ask));
    container.append(button);
    return { button, states };
  });
  return (state) => {
    for (const { button, states } of buttons) button.disabled = !states.includes(state);
  };
}

/** Draws the panel's state, timeline and judge. */
export function renderRollout(rollout, events) {
  fill(byId("rollout-state"), summary(rollout), rollout.reason && rollout.state !== "idle" ? ` ${rollout.reason}` : "");
  fill(byId("timeline"), rollout.state === "idle" ? [] : timeline(rollout));
  fill(byId("judge"), rollout.judge ? judgeNumbers(rollout.judge) : el("p", {}, "No verdict of the judge yet."),
    rollout.state === "idle" ? null : history(rollout, events));
}
