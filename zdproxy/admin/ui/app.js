// The dashboard: asks for the admin token, checks it with GET /v1/status, then follows
// the streams (feed.js) and draws every panel from what they bring. Commands are
// confirmed in the page's own dialog first.

import { token, call, TokenRefused } from "./api.js";
import { Store, follow } from "./feed.js";
import { createCharts } from "./charts.js";
import { renderOverview, poolsPanel, renderRules, renderKinds, renderEvents } from "./panels.js";
import { rolloutCommands, renderRollout } from "./rollout.js";
import { byId, fill } from "./dom.js";

let store = null;
let stopFollowing = null;
let panels = null; // made once the dashboard is first shown (the charts need its width)
let changed = new Set(); // message types since the last draw

function feedState(text) {
  fill(byId("feed-state"), text);
}

function notice(text) {
  fill(byId("notice"), text);
}

/** Draw what changed, at most once a frame (and not at all in a hidden tab). */
function schedule(type) {
  changed.add(type);
  if (changed.size === 1) requestAnimationFrame(draw);
}

function draw() {
  const types = changed;
  changed = new Set();
  const status = store?.status;
  if (!status) return;
  const all = types.has("snapshot");
  if (all || types.has("status")) {
    renderOverview(status);
    panels.pools(status);
    renderRules(status);
    panels.commands(status.rollout.state);
  }
  if (all || types.has("status") || types.has("event")) renderRollout(status.rollout, store.events);
  if (all || types.has("event")) {
    renderKinds(store.events);
    renderEvents(store.events);
  }
  if (all || types.has("samples") || types.has("event")) panels.charts.update(store.samples, store.events);
}

// -- the token ---------------------------------------------------------------------------

function showLogin(problem) {
  stopFollowing?.();
  stopFollowing = null;
  store = null; // nothing of the last session stays on the page
  byId("dashboard").hidden = true;
  byId("forget").hidden = true;
  byId("login").hidden = false;
  fill(byId("login-problem"), problem);
  feedState("not connected");
  byId("token").focus();
}

function refused(problem) {
  token.forget();
  showLogin(problem);
}

async function connect(secret) {
  fill(byId("login-problem"), "");
  let answer;
  try {
    answer = await call("GET", "/v1/status", undefined, secret);
  } catch (error) {
    if (error instanceof TokenRefused) {
      refused("The admin API refused this token (401). It is the content of admin.token_file.");
    } else {
      showLogin(`Cannot reach the admin API: ${error.message}`);
    }
    return;
  }
  if (!answer.ok) {
    showLogin(`The admin API answered ${answer.status}: ${answer.body.detail}`);
    return;
  }
  token.set(secret);
  byId("login").hidden = true;
  byId("dashboard").hidden = false;
  byId("forget").hidden = false;
  panels ??= {
    charts: createCharts(byId("charts")),
    pools: poolsPanel(byId("pools"), command),
    commands: rolloutCommands(byId("rollout-actions"), command),
  };
  store = new Store(schedule);
  store.apply({ type: "status", data: answer.body });
  stopFollowing = follow(secret, store, feedState, () =>
    refused("The admin API no longer accepts the token (was it replaced?): enter the new one."));
}

// -- commands ----------------------------------------------------------------------------

/** The page's own confirmation dialog: resolves true for Confirm, false for Cancel or Esc. */
function confirm(question) {
  const dialog = byId("confirm");
  const [yes, no] = [byId("confirm-yes"), byId("confirm-no")];
  fill(byId("confirm-text"), question);
  return new Promise((resolve) => {
    const answer = (value) => {
      yes.onclick = no.onclick = dialog.oncancel = null;
      dialog.close();
      resolve(value);
    };
    yes.onclick = () => answer(true);
    no.onclick = () => answer(false);
    dialog.oncancel = (event) => {
      event.preventDefault();
      answer(false);
    };
    dialog.showModal();
    no.focus(); // Enter on a dialog just opened must not change anything
  });
}

function outcome(body) {
  if (body.state) return `rollout ${body.id ?? ""}: ${body.state.replace("_", " ")}. ${body.reason ?? ""}`;
  if (body.upstreams) return `${body.upstreams.join(", ") || "nothing"}`;
  return "done";
}

async function command(path, body, question) {
  if (!(await confirm(question))) return;
  notice(`${path}: sending…`);
  try {
    const answer = await call("POST", path, body);
    notice(answer.ok ? `${path}: ${outcome(answer.body)}` : `${path}: refused: ${answer.body.detail}`);
  } catch (error) {
    if (error instanceof TokenRefused) refused("The admin API no longer accepts the token: enter it again.");
    else notice(`${path}: failed: ${error.message}`);
  }
}

// -- start -------------------------------------------------------------------------------

byId("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = byId("token");
  const secret = input.value.trim();
  input.value = "";
  if (secret) connect(secret);
});
byId("forget").addEventListener("click", () => {
  token.forget();
  showLogin("");
});
byId("event-kind").addEventListener("change", () => store && renderEvents(store.events));

const saved = token.get();
if (saved) connect(saved);
