// The output viewer of the run page (markup: tasks_app/output_view.py).
//
// Each attempt's output is a <div class="output"> holding a search box, an
// "All / stdout / stderr" switch and a <pre> of <span class="line"
// data-stream=... data-n=...> elements. The switch sets data-show on the
// viewer and CSS hides the other stream's lines, so lines appended later are
// filtered too. The search marks every case-insensitive match in the lines
// shown (<mark class="hit">), says "3 of 17", and Enter / Shift+Enter move
// to the next / previous one. Nothing is removed from the output.
//
// A page that appends lines itself (the live run page) calls
// window.outputViewer.refresh(preOrViewer), or dispatches an
// "output:appended" event that bubbles from the <pre>, to search them too.
// After an htmx swap every viewer is set up again with its previous choice.
(function () {
  "use strict";
  var DEBOUNCE_MS = 120;
  var kept = {}; // viewer id -> { show, current }, across htmx swaps

  function escapeRegExp(text) {
    return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  }

  function lines(viewer) {
    return viewer.querySelectorAll("pre.output-lines .line");
  }

  function clearHits(viewer) {
    var parents = new Set();
    viewer.querySelectorAll("mark.hit").forEach(function (mark) {
      parents.add(mark.parentNode);
      mark.replaceWith(document.createTextNode(mark.textContent));
    });
    parents.forEach(function (parent) {
      parent.normalize();
    });
  }

  // Wrap [start, end) of a line's text (its text nodes in order) in marks
  // numbered `hit`; a match across colour spans gets one mark per piece.
  function wrap(pieces, hit) {
    // Last piece first: splitting a node keeps the offsets before it valid.
    for (var i = pieces.length - 1; i >= 0; i--) {
      var piece = pieces[i];
      var node = piece.node;
      if (piece.end < node.data.length) node.splitText(piece.end);
      var middle = piece.start > 0 ? node.splitText(piece.start) : node;
      var mark = document.createElement("mark");
      mark.className = "hit";
      mark.setAttribute("data-hit", hit);
      middle.replaceWith(mark);
      mark.appendChild(middle);
    }
  }

  function markLine(line, pattern, first) {
    var nodes = [];
    var walker = document.createTreeWalker(line, NodeFilter.SHOW_TEXT);
    var text = "";
    while (walker.nextNode()) {
      nodes.push({ node: walker.currentNode, at: text.length });
      text += walker.currentNode.data;
    }
    var matches = [];
    var found;
    pattern.lastIndex = 0;
    while ((found = pattern.exec(text)) !== null) {
      matches.push([found.index, found.index + found[0].length]);
    }
    // Last match first, for the same reason as in wrap().
    for (var m = matches.length - 1; m >= 0; m--) {
      var start = matches[m][0];
      var end = matches[m][1];
      var pieces = [];
      nodes.forEach(function (entry) {
        var from = Math.max(start, entry.at);
        var to = Math.min(end, entry.at + entry.node.data.length);
        if (from < to) pieces.push({ node: entry.node, start: from - entry.at, end: to - entry.at });
      });
      wrap(pieces, first + m);
    }
    return matches.length;
  }

  function search(viewer, keepPlace) {
    var input = viewer.querySelector(".output-search");
    var count = viewer.querySelector(".output-count");
    var state = kept[viewer.id] || (kept[viewer.id] = { show: "all", current: 0 });
    clearHits(viewer);
    var query = input ? input.value : "";
    state.query = query;
    if (!query) {
      count.textContent = "";
      state.total = 0;
      return;
    }
    var pattern = new RegExp(escapeRegExp(query), "gi");
    var total = 0;
    lines(viewer).forEach(function (line) {
      if (state.show !== "all" && line.getAttribute("data-stream") !== state.show) return;
      total += markLine(line, pattern, total);
    });
    state.total = total;
    if (!keepPlace || state.current >= total) state.current = 0;
    select(viewer, !keepPlace);
  }

  function select(viewer, scroll) {
    var state = kept[viewer.id];
    var count = viewer.querySelector(".output-count");
    viewer.querySelectorAll("mark.hit.current").forEach(function (mark) {
      mark.classList.remove("current");
    });
    if (!state.total) {
      count.textContent = "No matches";
      return;
    }
    var marks = viewer.querySelectorAll('mark.hit[data-hit="' + state.current + '"]');
    marks.forEach(function (mark) {
      mark.classList.add("current");
    });
    count.textContent = state.current + 1 + " of " + state.total;
    if (scroll && marks.length) marks[0].scrollIntoView({ block: "center", inline: "nearest" });
  }

  function step(viewer, by) {
    var state = kept[viewer.id];
    if (!state || !state.total) return;
    state.current = (state.current + by + state.total) % state.total;
    select(viewer, true);
  }

  function show(viewer, which) {
    var state = kept[viewer.id] || (kept[viewer.id] = { show: "all", current: 0 });
    state.show = which;
    viewer.setAttribute("data-show", which);
    viewer.querySelectorAll(".output-streams button").forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.getAttribute("data-show") === which));
    });
  }

  function setUp(viewer) {
    if (viewer.hasAttribute("data-ready")) return;
    viewer.setAttribute("data-ready", "");
    var state = kept[viewer.id] || (kept[viewer.id] = { show: "all", current: 0 });
    show(viewer, state.show);
    var input = viewer.querySelector(".output-search");
    // The search box is kept across htmx swaps (hx-preserve) with its
    // listeners; only a new one gets them.
    if (input && !input.hasAttribute("data-ready")) {
      input.setAttribute("data-ready", "");
      var timer = null;
      input.addEventListener("input", function () {
        clearTimeout(timer);
        timer = setTimeout(function () {
          search(input.closest(".output"), false);
        }, DEBOUNCE_MS);
      });
      input.addEventListener("keydown", function (event) {
        if (event.key !== "Enter") return;
        event.preventDefault();
        var current = input.closest(".output");
        clearTimeout(timer);
        if (kept[current.id].query !== input.value) {
          search(current, false); // typed, not searched yet: its first match
        } else {
          step(current, event.shiftKey ? -1 : 1);
        }
      });
    }
    viewer.querySelectorAll(".output-streams button").forEach(function (button) {
      button.addEventListener("click", function () {
        show(viewer, button.getAttribute("data-show"));
        search(viewer, false);
      });
    });
    viewer.addEventListener("output:appended", function () {
      search(viewer, true);
    });
    if (input && input.value) search(viewer, true);
  }

  function setUpAll() {
    document.querySelectorAll(".output").forEach(setUp);
  }

  window.outputViewer = {
    refresh: function (element) {
      var viewer = element.closest(".output");
      if (viewer) search(viewer, true);
    },
  };

  document.addEventListener("DOMContentLoaded", setUpAll);
  document.addEventListener("htmx:afterSwap", setUpAll);
  document.addEventListener("live:swapped", setUpAll); // a live update (static/js/live.js)
})();
