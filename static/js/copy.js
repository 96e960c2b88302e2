// "Copy" buttons: <button data-copy="#element-id"> copies that element's text.
// navigator.clipboard exists only in a secure context (https, localhost), and a
// master is often reached over plain http on the LAN; there we select the text
// and fall back to document.execCommand("copy"), leaving it selected for Ctrl-C
// if even that is refused. Delegated, so it works on HTMX-swapped content.
(function () {
  "use strict";

  function selectText(element) {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  async function copy(text, element) {
    if (window.isSecureContext && navigator.clipboard) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (error) {
        // Permission refused: fall through to the selection.
      }
    }
    selectText(element);
    try {
      return document.execCommand("copy");
    } catch (error) {
      return false;
    }
  }

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const copied = await copy(source.textContent, source);
    button.textContent = copied ? "Copied" : "Press Ctrl-C";
    button.dataset.copied = copied ? "yes" : "no";
    clearTimeout(button._copyTimer);
    button._copyTimer = setTimeout(function () {
      button.textContent = "Copy";
      delete button.dataset.copied;
    }, 2500);
  });
})();
