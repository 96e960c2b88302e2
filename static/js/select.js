// The runs list's bulk selection: "select all on this page", a count on the
// bulk bar, and checked runs that stay checked when the table is swapped in
// again (a live update) while they are still shown. Runs no longer shown (a
// filter changed, a page turned) are forgotten: what is sent is what is seen.
(function () {
  "use strict";
  var chosen = new Set();

  function boxes() {
    return document.querySelectorAll("input[type=checkbox][name=ids][form=run-bulk]");
  }

  function sync() {
    var shown = new Set();
    var checked = 0;
    boxes().forEach(function (box) {
      shown.add(box.value);
      box.checked = chosen.has(box.value);
      if (box.checked) checked += 1;
    });
    chosen.forEach(function (id) {
      if (!shown.has(id)) chosen.delete(id);
    });
    document.querySelectorAll("[data-select-all]").forEach(function (all) {
      all.checked = shown.size > 0 && checked === shown.size;
      all.indeterminate = checked > 0 && checked < shown.size;
    });
    var count = document.querySelector("[data-selected-count]");
    if (count) {
      if (!count.dataset.idle) count.dataset.idle = count.textContent;
      count.textContent = checked ? checked + " selected:" : count.dataset.idle;
    }
  }

  document.addEventListener("change", function (event) {
    var box = event.target;
    if (box.matches("[data-select-all]")) {
      boxes().forEach(function (one) {
        if (box.checked) chosen.add(one.value);
        else chosen.delete(one.value);
      });
    } else if (box.matches("input[name=ids][form=run-bulk]")) {
      if (box.checked) chosen.add(box.value);
      else chosen.delete(box.value);
    } else {
      return;
    }
    sync();
  });

  document.addEventListener("htmx:afterSettle", sync);
  document.addEventListener("live:swapped", sync); // a live update (static/js/live.js)
  document.addEventListener("DOMContentLoaded", function () {
    // A reload keeps the browser's own checks: start from them.
    boxes().forEach(function (box) {
      if (box.checked) chosen.add(box.value);
    });
    sync();
  });

  document.addEventListener("submit", function (event) {
    if (event.target.id !== "run-bulk") return;
    if (!chosen.size) {
      event.preventDefault();
      var count = document.querySelector("[data-selected-count]");
      if (count) count.textContent = "Check the runs to act on first:";
    }
  });
})();
