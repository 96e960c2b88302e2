// Output boxes on a live page keep their place when htmx swaps the page in
// again: a box scrolled to its end follows the new lines; one the reader
// scrolled up stays where it was. A running attempt's box opens at its end.
(function () {
  "use strict";
  var NEAR_END = 24; // px: "at the end" despite rounding and a partial line
  var places = {};

  function atEnd(box) {
    return box.scrollHeight - box.scrollTop - box.clientHeight <= NEAR_END;
  }

  function boxes() {
    return document.querySelectorAll("pre.log[id]");
  }

  document.addEventListener("htmx:beforeSwap", function () {
    places = {};
    boxes().forEach(function (box) {
      places[box.id] = { top: box.scrollTop, follow: atEnd(box) };
    });
  });

  document.addEventListener("htmx:afterSwap", function () {
    boxes().forEach(function (box) {
      var place = places[box.id];
      if (place && !place.follow) {
        box.scrollTop = place.top;
      } else if (place || box.hasAttribute("data-follow")) {
        box.scrollTop = box.scrollHeight;
      }
    });
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre.log[data-follow]").forEach(function (box) {
      box.scrollTop = box.scrollHeight;
    });
  });
})();
