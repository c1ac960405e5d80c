// The account pages' one nicety: times as the reader's local time (the server sends unix seconds).
"use strict";
for (const element of document.querySelectorAll("time[data-t]")) {
  const at = new Date(Number(element.dataset.t) * 1000);
  element.dateTime = at.toISOString();
  element.textContent = at.toLocaleString();
}

// Copy buttons: the text of the element a button names, to the clipboard (or selected, where the
// page is not served over HTTPS or from localhost and the clipboard is out of reach).
for (const button of document.querySelectorAll("button[data-copy]")) {
  button.addEventListener("click", async () => {
    const source = document.getElementById(button.dataset.copy);
    try {
      await navigator.clipboard.writeText(source.textContent);
      button.textContent = "Copied";
    } catch {
      const range = document.createRange();
      range.selectNodeContents(source);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });
}
