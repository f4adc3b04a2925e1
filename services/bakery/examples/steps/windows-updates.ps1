# Every update Windows Update offers, Patch Tuesday's included; reboots are handled by the next step's boot.
$ErrorActionPreference = 'Stop'
Install-PackageProvider -Name NuGet -Force | Out-Null
Install-Module -Name PSWindowsUpdate -Force
Get-WindowsUpdate -AcceptAll -Install -IgnoreReboot
