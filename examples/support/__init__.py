"""The built-in `support` loop: answers a refund request from a policy kept in long-term memory."""
