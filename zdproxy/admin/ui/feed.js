// What the page shows, kept up to date by two streams of the admin API:
// GET /v1/status?follow=1 (each second the status and each color's traffic over that
// second, after the last 15 minutes of it) and GET /v1/events?follow=1.
//
// One stream per browser, not per tab: a browser opens at most 6 HTTP/1.1 connections
// to one host, so tabs that each held two streams would lock each other out from the
// fourth on. The tabs of this origin elect one (a Web Lock); it reads the streams and
// passes every message on to the others (a BroadcastChannel). When it closes, the next
// tab takes the lock and the streams. Where Web Locks are missing (a page served over
// plain HTTP from another host is not a secure context), each tab reads its own.

import { stream, TokenRefused } from "./api.js";

const LOCK = "zdproxy-dashboard-feed";
const CHANNEL = "zdproxy-dashboard";
const KEPT_SAMPLES = 900; // as the server's ring: 15 minutes of 1-second samples
const KEPT_EVENTS = 1000;
const EVENT_HISTORY = 200; // events asked for at the first connect
const SERIES = ["requests_per_second", "error_rate", "p50_ms", "p99_ms", "effective_share"];
const COLORS = ["blue", "green"];

function noSamples() {
  const colors = {};
  for (const color of COLORS) colors[color] = Object.fromEntries(SERIES.map((s) => [s, []]));
  return { time: [], colors };
}

/** The state every part of the page draws from; `onChange` after each message. */
export class Store {
  constructor(onChange) {
    this.samples = noSamples();
    this.status = null;
    this.events = [];
    this.onChange = onChange;
  }

  apply(message) {
    if (message.type === "samples") this.addSamples(message.data, message.replace);
    else if (message.type === "status") this.status = message.data;
    else if (message.type === "event") this.addEvents([message.data]);
    else if (message.type === "snapshot") {
      this.addSamples(message.samples, true);
      this.status = message.status;
      this.addEvents(message.events);
    } else return;
    this.onChange(message.type);
  }

  snapshot() {
    return { type: "snapshot", samples: this.samples, status: this.status, events: this.events };
  }

  addSamples(columns, replace) {
    if (replace) this.samples = noSamples();
    const kept = this.samples;
    kept.time.push(...columns.time);
    for (const color of COLORS) {
      for (const series of SERIES) kept.colors[color][series].push(...columns.colors[color][series]);
    }
    const extra = kept.time.length - KEPT_SAMPLES;
    if (extra > 0) {
      kept.time.splice(0, extra);
      for (const color of COLORS) for (const series of SERIES) kept.colors[color][series].splice(0, extra);
    }
  }

  addEvents(events) {
    const last = this.events.length ? this.events[this.events.length - 1].id : 0;
    const fresh = events.filter((e) => e.id > last);
    if (!fresh.length) return;
    this.events.push(...fresh);
    if (this.events.length > KEPT_EVENTS) this.events.splice(0, this.events.length - KEPT_EVENTS);
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

/** Reconnects `open` whenever its stream ends or fails, until aborted; a refused token ends it. */
async function keep(open, signal, onState) {
  let backoff = 1000;
  while (!signal.aborted) {
    try {
      await open();
      backoff = 1000; // it had connected: the server ended it (a restart, or it lagged)
    } catch (error) {
      if (error instanceof TokenRefused) throw error;
      if (signal.aborted) return;
    }
    onState("reconnecting…");
    await pause(backoff + Math.random() * 250, signal);
    backoff = Math.min(backoff * 2, 10000);
  }
}

/** Read both streams, `publish` every message; resolves once `signal` aborts. */
async function lead(secret, publish, signal, onState) {
  let lastEventId = null;
  const status = () => {
    let first = true;
    return stream(
      "/v1/status?follow=1",
      ({ event, data }) => {
        if (event === "samples") {
          publish({ type: "samples", replace: first, data });
          first = false;
        } else if (event === "status") {
          publish({ type: "status", data });
          onState("live");
        }
      },
      { signal, secret },
    );
  };
  const events = () =>
    stream(
      lastEventId ? "/v1/events?follow=1" : `/v1/events?follow=1&limit=${EVENT_HISTORY}`,
      ({ id, data }) => {
        lastEventId = id;
        publish({ type: "event", data });
      },
      { signal, secret, lastEventId },
    );
  await Promise.all([keep(status, signal, onState), keep(events, signal, onState)]);
}

/**
 * Start following with a token the API accepted. `onState(text)` tells how the page is
 * connected; `onRefused()` when the API refuses the token later (it was replaced).
 * Returns a function that stops everything.
 */
export function follow(secret, store, onState, onRefused) {
  const abort = new AbortController();
  const channel = "BroadcastChannel" in window ? new BroadcastChannel(CHANNEL) : null;
  let leading = false;
  const publish = (message) => {
    store.apply(message);
    channel?.postMessage(message);
  };
  const run = async () => {
    leading = true;
    onState("connecting…");
    try {
      await lead(secret, publish, abort.signal, onState);
    } catch (error) {
      if (error instanceof TokenRefused) onRefused();
    } finally {
      leading = false;
    }
  };
  if (channel) {
    channel.onmessage = ({ data }) => {
      if (data.type === "hello") {
        if (leading) channel.postMessage(store.snapshot());
      } else if (!leading) {
        store.apply(data);
        if (data.type === "status" || data.type === "snapshot") onState("live (through another tab)");
      }
    };
  }
  if (channel && navigator.locks) {
    onState("waiting for another tab's stream…");
    channel.postMessage({ type: "hello" }); // a leader answers with what it has
    navigator.locks.request(LOCK, { signal: abort.signal }, run).catch(() => {});
  } else {
    run();
  }
  return () => {
    abort.abort();
    channel?.close();
  };
}
