// Times in the viewer's own zone. The server writes every time as
// <time datetime="ISO UTC" title="... UTC" data-local="datetime|time">, its
// text in the server's zone; this rewrites the text into the browser's zone
// (Intl.DateTimeFormat) and leaves the title, the UTC time, for the hover.
// Regions swapped in later (htmx, the live page) are rewritten as they arrive.
(function () {
  "use strict";
  var FIELDS = {
    year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
    hourCycle: "h23", timeZoneName: "short"
  };
  var format = new Intl.DateTimeFormat("en-CA", FIELDS);

  function text(date, kind) {
    var p = {};
    format.formatToParts(date).forEach(function (part) { p[part.type] = part.value; });
    var clock = p.hour + ":" + p.minute + ":" + p.second;
    if (kind === "time") {
      return clock;
    }
    return p.year + "-" + p.month + "-" + p.day + " " + clock + " " + p.timeZoneName;
  }

  function localize(root) {
    if (!root.querySelectorAll) {
      return;
    }
    var found = root.matches && root.matches("time[data-local]") ? [root] : [];
    root.querySelectorAll("time[data-local]").forEach(function (el) { found.push(el); });
    found.forEach(function (el) {
      var date = new Date(el.getAttribute("datetime"));
      if (isNaN(date.getTime())) {
        return;
      }
      var said = text(date, el.getAttribute("data-local"));
      if (el.textContent !== said) {
        el.textContent = said;
      }
      el.setAttribute("data-localized", "");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localize(document.body);
    // Only added elements are looked at: rewriting a <time>'s text adds a
    // text node, never an element, so this does not feed itself.
    new MutationObserver(function (records) {
      records.forEach(function (record) {
        record.addedNodes.forEach(function (node) {
          if (node.nodeType === 1) {
            localize(node);
          }
        });
      });
    }).observe(document.body, { childList: true, subtree: true });
  });
})();
