"""An agent loop's example: a scripted ACP agent (scripted_agent.py) that fixes files offline."""
