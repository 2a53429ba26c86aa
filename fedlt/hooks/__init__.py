"""The plugin contract and its machinery: hook declarations, the Plugin base class, discovery,
dispatch, and the contexts and recipe hooks receive."""
