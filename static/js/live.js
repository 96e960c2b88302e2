// The page's live socket (tasks_app/consumers.py): no polling. Elements with
// data-live-src / data-live-on are regions the server re-renders when their
// events commit; a run page's output boxes get new lines appended as they are
// stored. A box scrolled to its end follows them; one scrolled up stays put.
// A lost socket shows a bar and reconnects with backoff, then catches up from
// the last event and output line it had.
(function () {
  "use strict";
  var NEAR_END = 24; // px: "at the end" despite rounding and a partial line
  var socket = null;
  var delay = 500; // ms before the next reconnect; doubles up to 5 s
  var lastId = null; // the newest event the page reflects
  var cursors = {}; // attempt id -> next output seq the page lacks
  var states = {}; // attempt id -> the renderer's state at that seq (tasks_app/output_view.py)
  var MAX_STATE = 8192; // a longer state (a huge unfinished line) is rebuilt by the server
  var bar = null;

  function atEnd(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight <= NEAR_END;
  }

  function regions() {
    return Array.prototype.map.call(document.querySelectorAll("[data-live-src][id]"), function (el) {
      return { id: el.id, src: el.getAttribute("data-live-src"), on: el.getAttribute("data-live-on") || "" };
    });
  }

  function runId() {
    var el = document.querySelector("[data-live-run]");
    return el ? parseInt(el.getAttribute("data-live-run"), 10) : null;
  }

  // Attempts shown whose cursor the page does not hold yet: {id: next seq}.
  function newAttempts() {
    var found = {};
    document.querySelectorAll("[data-attempt][data-next]").forEach(function (el) {
      var id = el.getAttribute("data-attempt");
      if (!(id in cursors)) {
        cursors[id] = parseInt(el.getAttribute("data-next"), 10) || 0;
        var state = el.getAttribute("data-state");
        states[id] = state && state.length <= MAX_STATE ? JSON.parse(state) : null;
        found[id] = cursors[id];
      }
    });
    return found;
  }

  function statesOf(ids) {
    var out = {};
    ids.forEach(function (id) { out[id] = states[id] || null; });
    return out;
  }

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
  }

  function watch(since) {
    newAttempts();
    send({ type: "watch", regions: regions(), page: location.href, run: runId(),
           output: cursors, states: statesOf(Object.keys(cursors)), since: since });
  }

  // New lines, as the server rendered them (one <span class="line"> each):
  // the unfinished lines at the end are replaced by the new tail. A box at its
  // end follows them; an open search counts them (static/js/output.js).
  function appendOutput(box, html, tail) {
    var follow = atEnd(box);
    box.querySelectorAll(".line.partial").forEach(function (line) { line.remove(); });
    box.insertAdjacentHTML("beforeend", html + tail);
    if (follow) box.scrollTop = box.scrollHeight;
    box.dispatchEvent(new CustomEvent("output:appended", { bubbles: true }));
  }
  window.appendOutput = appendOutput;

  // Swap a region in, keeping the output boxes the page already has (their
  // lines and scroll place): the server's re-render leaves output out.
  function swap(id, html) {
    var old = document.getElementById(id);
    if (!old) return;
    var holder = document.createElement("div");
    holder.innerHTML = html;
    var fresh = holder.firstElementChild;
    if (!fresh) return;
    var kept = [];
    // An output viewer (its lines, search and stream choice) stays as the page has it.
    fresh.querySelectorAll("[data-live-keep][id]").forEach(function (box) {
      var mine = document.getElementById(box.id);
      if (mine && old.contains(mine)) {
        var log = mine.querySelector("pre.log") || mine;
        kept.push({ box: log, top: log.scrollTop, follow: atEnd(log) });
        box.replaceWith(mine);
      }
    });
    old.replaceWith(fresh);
    kept.forEach(function (k) { k.box.scrollTop = k.follow ? k.box.scrollHeight : k.top; });
    if (window.htmx) htmx.process(fresh);
    // Like an htmx swap, for scripts that keep state across them (static/js/select.js).
    fresh.dispatchEvent(new CustomEvent("live:swapped", { bubbles: true }));
    regionsChanged();
  }

  var watched = "";
  function regionsChanged() {
    var now = JSON.stringify(regions());
    var added = newAttempts();
    if (now !== watched) {
      watched = now;
      watch(null);
    } else if (Object.keys(added).length) {
      send({ type: "cursors", output: added, states: statesOf(Object.keys(added)) });
    }
  }

  function showBar(show) {
    if (show && !bar) {
      bar = document.createElement("div");
      bar.id = "live-disconnected";
      bar.className = "live-disconnected";
      bar.setAttribute("role", "status");
      bar.textContent = "Live updates disconnected \u2014 reconnecting\u2026";
      document.body.insertBefore(bar, document.body.firstChild);
    } else if (!show && bar) {
      bar.remove();
      bar = null;
    }
  }

  function onMessage(event) {
    var frame = JSON.parse(event.data);
    if (frame.type === "html") {
      if (frame.last_id != null && (lastId == null || frame.last_id > lastId)) lastId = frame.last_id;
      swap(frame.id, frame.html);
    } else if (frame.type === "output") {
      var box = document.getElementById("out-" + frame.attempt);
      if (!box || frame.seq < (cursors[frame.attempt] || 0)) return; // not shown, or had it
      cursors[frame.attempt] = frame.seq + 1;
      states[frame.attempt] = JSON.stringify(frame.state).length <= MAX_STATE ? frame.state : null;
      box.setAttribute("data-seq", frame.seq);
      appendOutput(box, frame.html, frame.tail);
    } else if (frame.type === "error" && window.console) {
      console.warn("live updates:", frame.message);
    }
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(scheme + "//" + location.host + "/ws/live/");
    window.__liveSocket = socket; // for tests: cut it and watch the page recover
    socket.onopen = function () {
      delay = 500;
      showBar(false);
      watched = JSON.stringify(regions());
      watch(lastId);
    };
    socket.onmessage = onMessage;
    socket.onclose = function () {
      showBar(true);
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre.log[data-follow]").forEach(function (box) {
      box.scrollTop = box.scrollHeight;
    });
    // htmx swaps of our own (a filter, a pager, a button) may change the regions.
    document.body.addEventListener("htmx:afterSettle", regionsChanged);
    if (!document.querySelector("[data-live-src]")) return;
    var since = document.body.getAttribute("data-live-since");
    lastId = since ? parseInt(since, 10) : null;
    connect();
  });
})();
